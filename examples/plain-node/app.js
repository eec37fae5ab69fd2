// Plain-module style: req carries method, path, query, headers and body; res offers
// status(), set(), send() and json().
module.exports.greet = {
  func: async (req, res) => {
    if (req.method === "POST") {
      return res.status(201).set("x-echo", "yes").json({ received: req.body });
    }
    res.set("content-type", "text/plain").send(`Hello ${req.query.name || "world"} from ${req.path}`);
  },
  config: { timeout: 10_000 },
};
