//! `gust init NAME --runtime nodejs|python`: a working function to start from.

use std::path::Path;

use anyhow::{Context, bail};

pub fn init(dir: &Path, name: &str, runtime: &str) -> anyhow::Result<Vec<String>> {
    if !gust_core::valid_name(name) {
        bail!("{name:?} is not a valid name: use 1-64 letters, digits, '-' or '_'");
    }
    if dir.exists() {
        bail!(
            "{} already exists: choose another name or remove it",
            dir.display()
        );
    }
    let (handler, file, code) = match runtime {
        "nodejs" => ("index.handler", "index.js", NODE),
        "python" => ("handler.handler", "handler.py", PYTHON),
        other => bail!("runtime {other:?} is not one `gust init` scaffolds: use nodejs or python"),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let manifest = format!(
        "# gust manifest: see docs/manifest.md for every field.\n[service]\nname = \"{name}\"\n\n\
         [functions.{name}]\nruntime = \"{runtime}\"\nhandler = \"{handler}\"\nmemory = 128\ntimeout = 3\n\n\
         [[functions.{name}.routes]]\nmethod = \"GET\"\npath = \"/{name}\"\n"
    );
    std::fs::write(dir.join("gust.toml"), manifest)?;
    std::fs::write(dir.join(file), code)?;
    Ok(vec!["gust.toml".into(), file.into()])
}

const NODE: &str = r#"// A Lambda-style handler: it receives an API Gateway v2 event over HTTP, or any JSON payload
// through the Invoke API, and returns a response.
let invocations = 0; // module state survives between invocations of a warm instance

exports.handler = async (event, context) => {
  invocations += 1;
  return {
    statusCode: 200,
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ message: "Hello from gust", requestId: context.awsRequestId, invocations }),
  };
};
"#;

const PYTHON: &str = r#"# A Lambda-style handler: it receives an API Gateway v2 event over HTTP, or any JSON payload
# through the Invoke API, and returns a response.
import json

invocations = 0  # module state survives between invocations of a warm instance


def handler(event, context):
    global invocations
    invocations += 1
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"message": "Hello from gust", "requestId": context.aws_request_id, "invocations": invocations}),
    }
"#;
