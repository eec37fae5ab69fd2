//! API Gateway HTTP API payload format 2.0: the event a function receives for an HTTP request,
//! and the mapping of its result back to an HTTP response (lambda-contracts.md §2.4).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use gust_core::{lambda, now_ms, time};
use serde_json::{Map, Value, json};

/// What the gateway knows about one HTTP request, for the event.
pub struct HttpRequest<'a> {
    pub method: &'a Method,
    pub raw_path: &'a str,
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
    pub route_key: &'a str,
    pub path_parameters: Option<BTreeMap<String, String>>,
    pub source_ip: String,
    pub request_id: &'a str,
}

fn is_text(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return true };
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct.starts_with("text/")
        || ct.ends_with("+json")
        || ct.ends_with("+xml")
        || matches!(
            ct.as_str(),
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-www-form-urlencoded"
                | "application/graphql"
                | ""
        )
}

fn decode_component(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// Builds the event JSON.
pub fn event(r: &HttpRequest<'_>) -> Vec<u8> {
    let mut headers: Map<String, Value> = Map::new();
    let mut cookies: Vec<Value> = Vec::new();
    for (name, value) in r.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        if name == header::COOKIE {
            cookies.extend(
                v.split(';')
                    .map(|c| c.trim())
                    .filter(|c| !c.is_empty())
                    .map(|c| Value::String(c.into())),
            );
            continue;
        }
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&v);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(v.into_owned()));
            }
        }
    }
    let mut query: Map<String, Value> = Map::new();
    for pair in r.raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode_component(k), decode_component(v));
        match query.get_mut(&k) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&v);
            }
            _ => {
                query.insert(k, Value::String(v));
            }
        }
    }
    let now = now_ms();
    let header_str = |n: &str| r.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut ev = json!({
        "version": "2.0",
        "routeKey": r.route_key,
        "rawPath": r.raw_path,
        "rawQueryString": r.raw_query,
        "headers": headers,
        "requestContext": {
            "accountId": lambda::ACCOUNT_ID,
            "apiId": "gust",
            "domainName": header_str("host"),
            "domainPrefix": header_str("host").split('.').next().unwrap_or(""),
            "http": {
                "method": r.method.as_str(),
                "path": r.raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": r.source_ip,
                "userAgent": header_str("user-agent"),
            },
            "requestId": r.request_id,
            "routeKey": r.route_key,
            "stage": "$default",
            "time": time::clf(now),
            "timeEpoch": now,
        },
        "isBase64Encoded": false,
    });
    let obj = ev.as_object_mut().expect("object");
    if !cookies.is_empty() {
        obj.insert("cookies".into(), Value::Array(cookies));
    }
    if !query.is_empty() {
        obj.insert("queryStringParameters".into(), Value::Object(query));
    }
    if let Some(params) = &r.path_parameters {
        obj.insert("pathParameters".into(), json!(params));
    }
    if !r.body.is_empty() {
        let text = is_text(
            r.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        match std::str::from_utf8(r.body) {
            Ok(s) if text => {
                obj.insert("body".into(), Value::String(s.to_string()));
            }
            _ => {
                obj.insert("body".into(), Value::String(B64.encode(r.body)));
                obj.insert("isBase64Encoded".into(), Value::Bool(true));
            }
        }
    }
    serde_json::to_vec(&ev).expect("event serialises")
}

fn value_to_header(v: &Value) -> Option<HeaderValue> {
    match v {
        Value::String(s) => HeaderValue::from_str(s).ok(),
        Value::Number(n) => HeaderValue::from_str(&n.to_string()).ok(),
        Value::Bool(b) => HeaderValue::from_str(&b.to_string()).ok(),
        _ => None,
    }
}

/// Maps a function's successful result to the HTTP response. `None` means the result is
/// malformed (API Gateway answers 502).
pub fn response(body: Bytes, content_type: Option<&str>) -> Option<Response<Body>> {
    // A streaming-mode runtime's HTTP integration response: a JSON prelude, 8 NUL bytes, the
    // raw body (lambda-contracts.md §1.5). gust buffers it and maps it like a buffered one.
    if content_type == Some("application/vnd.awslambda.http-integration-response") {
        let split = body.windows(8).position(|w| w == [0u8; 8])?;
        let mut prelude: serde_json::Map<String, Value> =
            serde_json::from_slice(&body[..split]).ok()?;
        let raw = body.slice(split + 8..);
        prelude.entry("statusCode").or_insert(Value::from(200));
        prelude.remove("body");
        prelude.remove("isBase64Encoded");
        let mut r = response(Bytes::from(serde_json::to_vec(&prelude).ok()?), None)?;
        *r.body_mut() = Body::from(raw);
        return Some(r);
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let obj = match parsed {
        Some(Value::Object(m)) if m.contains_key("statusCode") => m,
        Some(_) => {
            // Valid JSON without statusCode: 200, application/json, the output as the body.
            return Some(plain(StatusCode::OK, "application/json", body));
        }
        None => {
            // Not JSON at all (a custom runtime posting text): pass it through.
            let ct = content_type.unwrap_or("text/plain; charset=utf-8");
            return Some(plain(StatusCode::OK, ct, body));
        }
    };
    let status = match &obj["statusCode"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .and_then(|n| u16::try_from(n).ok())
    .filter(|n| (200..=599).contains(n))
    .and_then(|n| StatusCode::from_u16(n).ok())?;
    let body_bytes = match obj.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => {
            if obj
                .get("isBase64Encoded")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                Bytes::from(B64.decode(s.as_bytes()).ok()?)
            } else {
                Bytes::from(s.clone())
            }
        }
        Some(other) => Bytes::from(other.to_string()),
    };
    let mut resp = Response::new(Body::from(body_bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Some(Value::Object(headers)) = obj.get("headers") {
        for (k, v) in headers {
            if let (Ok(name), Some(value)) =
                (HeaderName::from_bytes(k.as_bytes()), value_to_header(v))
            {
                h.append(name, value);
            }
        }
    }
    if let Some(Value::Object(multi)) = obj.get("multiValueHeaders") {
        for (k, vs) in multi {
            if let (Ok(name), Value::Array(vs)) = (HeaderName::from_bytes(k.as_bytes()), vs) {
                for v in vs.iter().filter_map(value_to_header) {
                    h.append(name.clone(), v);
                }
            }
        }
    }
    if let Some(Value::Array(cookies)) = obj.get("cookies") {
        for c in cookies.iter().filter_map(value_to_header) {
            h.append(header::SET_COOKIE, c);
        }
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Some(resp)
}

fn plain(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_follows_payload_2_0() {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.insert("cookie", HeaderValue::from_static("c1=1; c2=2"));
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        let body = Bytes::from_static(&[0, 159, 146, 150]);
        let ev = event(&HttpRequest {
            method: &Method::POST,
            raw_path: "/my/path",
            raw_query: "p1=v1&p1=v2&p2=a%20b+c",
            headers: &headers,
            body: &body,
            route_key: "POST /my/{x}",
            path_parameters: Some(BTreeMap::from([("x".to_string(), "path".to_string())])),
            source_ip: "127.0.0.1".into(),
            request_id: "rid",
        });
        let v: Value = serde_json::from_slice(&ev).unwrap();
        assert_eq!(v["version"], "2.0");
        assert_eq!(v["routeKey"], "POST /my/{x}");
        assert_eq!(v["headers"]["x-multi"], "a,b");
        assert!(v["headers"].get("cookie").is_none());
        assert_eq!(v["cookies"], json!(["c1=1", "c2=2"]));
        assert_eq!(
            v["queryStringParameters"],
            json!({"p1": "v1,v2", "p2": "a b c"})
        );
        assert_eq!(v["pathParameters"]["x"], "path");
        assert_eq!(v["requestContext"]["http"]["method"], "POST");
        assert_eq!(v["isBase64Encoded"], true);
        assert_eq!(
            B64.decode(v["body"].as_str().unwrap()).unwrap(),
            body.to_vec()
        );
    }

    #[test]
    fn response_mapping() {
        let r = response(Bytes::from(r#"{"statusCode":201,"headers":{"x-a":"1","X-N":2},"cookies":["a=1","b=2"],"body":"hi"}"#), None).unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.headers()["x-n"], "2");
        assert_eq!(r.headers().get_all("set-cookie").iter().count(), 2);
        let r = response(Bytes::from(r#"{"hello":"world"}"#), None).unwrap();
        assert_eq!(
            (r.status(), r.headers()["content-type"].to_str().unwrap()),
            (StatusCode::OK, "application/json")
        );
        let r = response(
            Bytes::from(r#"{"statusCode":200,"body":"AAEC","isBase64Encoded":true}"#),
            None,
        )
        .unwrap();
        assert_eq!(r.status(), 200);
        assert!(response(Bytes::from(r#"{"statusCode":"abc"}"#), None).is_none());
        assert!(
            response(Bytes::from(r#"{"statusCode":101}"#), None).is_none(),
            "1xx is not a final status"
        );
        assert!(
            response(
                Bytes::from(r#"{"statusCode":200,"body":"!!","isBase64Encoded":true}"#),
                None
            )
            .is_none()
        );
    }
}
