// The hello handler every benchmark runs, through gust and in-process in bare-node.js.
exports.handler = async (event) => ({
  statusCode: 200,
  headers: { "content-type": "text/plain" },
  body: "Hello from gust",
});
