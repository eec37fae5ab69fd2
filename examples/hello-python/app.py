# A Lambda-style Python handler with a Lambda-shaped context.
import json

invocations = 0  # survives between invocations of a warm instance


def handler(event, context):
    global invocations
    invocations += 1
    query = (event or {}).get("queryStringParameters") or {}
    print(f"invocation {invocations} for {context.aws_request_id}")
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({
            "message": f"Hello, {query.get('name', 'world')}!",
            "invocations": invocations,
            "function": context.function_name,
            "memory": context.memory_limit_in_mb,
            "remainingMs": context.get_remaining_time_in_millis(),
        }),
    }
