// The baseline: a bare Node HTTP server calling the same handler in-process, with the same
// response mapping gust does (statusCode, headers, body). Usage: node bare-node.js PORT
const http = require("http");
const { handler } = require("./functions/node/handler.js");
const port = Number(process.argv[2] || 8090);
http
  .createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const event = { version: "2.0", rawPath: req.url, headers: req.headers, body: Buffer.concat(chunks).toString() };
      const out = await handler(event, {});
      res.writeHead(out.statusCode, out.headers);
      res.end(out.body);
    });
  })
  .listen(port, "127.0.0.1", () => console.log(`bare node listening on ${port}`));
