//! Lambda wire shapes shared by the executors and the gateway: ARNs, error bodies, the timeout
//! and crash errors Lambda produces.

use bytes::Bytes;

pub const REGION: &str = "us-east-1";
pub const ACCOUNT_ID: &str = "000000000000";

pub fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{name}")
}

/// `{"errorMessage": …, "errorType": …}`, the body of every Lambda error.
pub fn error_body(error_type: &str, message: &str) -> Bytes {
    serde_json::json!({ "errorMessage": message, "errorType": error_type })
        .to_string()
        .into()
}

/// The body Lambda returns when a function times out.
pub fn timeout_body(request_id: &str, elapsed_secs: f64) -> Bytes {
    let message = format!(
        "{} {request_id} Task timed out after {elapsed_secs:.2} seconds",
        crate::time::iso8601_ms(crate::now_ms())
    );
    error_body("Sandbox.Timedout", &message)
}

/// The body Lambda returns when the runtime process exits during an invocation.
pub fn exit_body(request_id: &str, detail: &str) -> Bytes {
    error_body(
        "Runtime.ExitError",
        &format!("RequestId: {request_id} Error: Runtime exited with error: {detail}"),
    )
}

/// The error type and message of an instance killed for exceeding its memory limit.
pub const OUT_OF_MEMORY: &str = "Runtime.OutOfMemory";

/// The body returned when the instance exceeded its memory limit.
pub fn out_of_memory_body(request_id: &str, detail: &str) -> Bytes {
    error_body(
        OUT_OF_MEMORY,
        &format!("RequestId: {request_id} Error: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_body_names_the_request_and_duration() {
        let body = timeout_body("abc", 1.0);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let msg = v["errorMessage"].as_str().unwrap();
        assert!(
            msg.ends_with("abc Task timed out after 1.00 seconds"),
            "{msg}"
        );
        assert_eq!(v["errorType"], "Sandbox.Timedout");
    }
}
