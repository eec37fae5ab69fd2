// A Lambda-style handler. Over HTTP it receives an API Gateway HTTP API (payload 2.0) event;
// through the Invoke API, whatever JSON the caller sends.
let invocations = 0; // survives between invocations of a warm instance

exports.handler = async (event, context) => {
  invocations += 1;
  const name = (event.pathParameters && event.pathParameters.name) || event.name || "world";
  console.log(`greeting ${name}`);
  return {
    statusCode: 200,
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      message: `${process.env.GREETING}, ${name}!`,
      invocations,
      requestId: context.awsRequestId,
      remainingMs: context.getRemainingTimeInMillis(),
    }),
  };
};
