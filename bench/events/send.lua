-- wrk: queue sends through the ingest route.
wrk.method = "POST"
wrk.body = "hello"
