# Served by awslambdaric, AWS's own runtime interface client, through gust's Runtime API.
count = 0


def handler(event, context):
    global count
    count += 1
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError("asked to fail")
    return {"runtime": "awslambdaric", "count": count, "echo": event, "requestId": context.aws_request_id}
