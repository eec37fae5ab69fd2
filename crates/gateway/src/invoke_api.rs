//! The Lambda Invoke API, `POST /2015-03-31/functions/{FunctionName}/invocations`, as the AWS
//! SDKs and CLI call it (lambda-contracts.md §2). SigV4 signatures are accepted and ignored.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use gust_core::{Invocation, InvokeError, LATEST, MAX_PAYLOAD, Outcome};

use crate::SharedApp;
use crate::error::{aws_error, invoke_api_error};

/// Splits `name`, `name:qualifier`, `123456789012:function:name[:q]` or a full ARN into the
/// function name and qualifier.
pub(crate) fn parse_function_name(raw: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = raw.split(':').collect();
    let (name, qual) = if parts.first() == Some(&"arn") && parts.len() >= 7 {
        (parts[6], parts.get(7))
    } else if parts.len() >= 3 && parts[1] == "function" {
        (parts[2], parts.get(3))
    } else {
        (parts[0], parts.get(1))
    };
    (name.to_string(), qual.map(|q| q.to_string()))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

pub(crate) async fn invoke(
    State(app): State<SharedApp>,
    Path(raw_name): Path<String>,
    req: Request,
) -> Response {
    let (name, qual_in_name) = parse_function_name(&raw_name);
    let qualifier = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("Qualifier=")))
        .map(|q| {
            percent_encoding::percent_decode_str(q)
                .decode_utf8_lossy()
                .into_owned()
        })
        .or(qual_in_name);
    if let Some(q) = &qualifier
        && q != LATEST
    {
        return aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!(
                "Function not found: {}:{q} (gust serves $LATEST only; versions and aliases come later)",
                gust_core::lambda::function_arn(&name)
            ),
        );
    }
    let headers = req.headers().clone();
    let invocation_type =
        header_str(&headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    match invocation_type {
        "RequestResponse" | "DryRun" | "Event" => {}
        other => {
            return aws_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!(
                    "InvocationType {other:?} is not valid: use RequestResponse, Event or DryRun"
                ),
            );
        }
    }
    let tail = match header_str(&headers, "x-amz-log-type") {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return aws_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!("LogType {other:?} is not valid: use None or Tail"),
            );
        }
    };
    let client_context = match header_str(&headers, "x-amz-client-context") {
        None => None,
        Some(b64) => match B64.decode(b64).ok().and_then(|b| String::from_utf8(b).ok()) {
            Some(json) if serde_json::from_str::<serde_json::Value>(&json).is_ok() => Some(json),
            _ => {
                return aws_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContentException",
                    "X-Amz-Client-Context must be base64-encoded JSON",
                );
            }
        },
    };
    let path = req.uri().path().to_string();
    let body = match crate::listener::read_body(req.into_body(), MAX_PAYLOAD).await {
        Ok(b) => b,
        Err(crate::error::BodyError::TooLarge(_)) => {
            return invoke_api_error(&InvokeError::PayloadTooLarge(MAX_PAYLOAD + 1));
        }
        Err(e) => return crate::error::body_error(&path, &e),
    };
    if invocation_type == "DryRun" {
        if app.platform.pools.get(&name).is_none() {
            return invoke_api_error(&InvokeError::NotFound(name));
        }
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut()
            .insert("x-amz-executed-version", HeaderValue::from_static(LATEST));
        return r;
    }
    // An empty payload is the empty JSON object, as on Lambda; anything else must be JSON.
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        bytes::Bytes::from_static(b"{}")
    } else if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "Could not parse request body into json: the payload must be JSON",
        );
    } else {
        body
    };
    if invocation_type == "Event" {
        // Stored before the 202 (lambda-contracts §3.3); runs at least once, retried per the
        // function's async settings.
        return match app.events.invoke_async(&name, payload, None, false).await {
            Ok(id) => {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::ACCEPTED;
                if let Ok(v) = HeaderValue::from_str(&id) {
                    r.headers_mut().insert("x-amzn-requestid", v);
                }
                r
            }
            Err(e) => crate::error::enqueue_error(&e, true),
        };
    }
    let invocation = Invocation {
        payload,
        content_type: None,
        client_context,
        trace_id: header_str(&headers, "x-amzn-trace-id").map(str::to_string),
        tail_log: tail,
        request_id: None,
    };
    let result = match app.invoker.invoke(&name, invocation).await {
        Ok(r) => r,
        Err(e) => return invoke_api_error(&e),
    };
    let (body, content_type, function_error) = match result.outcome {
        Outcome::Response { body, content_type } => (body, content_type, false),
        Outcome::FunctionError { body, .. } => (body, None, true),
    };
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        content_type
            .and_then(|c| HeaderValue::from_str(&c).ok())
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    if let Ok(v) = HeaderValue::from_str(&result.executed_version) {
        h.insert("x-amz-executed-version", v);
    }
    if let Ok(v) = HeaderValue::from_str(&result.request_id) {
        h.insert("x-amzn-requestid", v);
    }
    if function_error {
        h.insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
    }
    if let Some(tail) = result.log_tail
        && let Ok(v) = HeaderValue::from_str(&B64.encode(tail))
    {
        h.insert("x-amz-log-result", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::parse_function_name;

    #[test]
    fn function_names_arns_and_qualifiers() {
        assert_eq!(parse_function_name("f"), ("f".into(), None));
        assert_eq!(
            parse_function_name("f:$LATEST"),
            ("f".into(), Some("$LATEST".into()))
        );
        assert_eq!(
            parse_function_name("123456789012:function:f"),
            ("f".into(), None)
        );
        assert_eq!(
            parse_function_name("arn:aws:lambda:us-east-1:123456789012:function:f:prod"),
            ("f".into(), Some("prod".into()))
        );
    }
}
