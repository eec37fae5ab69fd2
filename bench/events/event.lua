-- wrk: asynchronous Invoke API calls (X-Amz-Invocation-Type: Event).
wrk.method = "POST"
wrk.body = '{"n":1}'
wrk.headers["X-Amz-Invocation-Type"] = "Event"
wrk.headers["Content-Type"] = "application/json"
