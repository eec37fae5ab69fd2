//! gust's endpoint for instances: what a function's code reaches at `127.0.0.1:9002` inside
//! its sandbox (`GUST_ENDPOINT_URL`), the one address of gust an instance can connect to
//! (docs/SANDBOX.md, "Network"). Only the Invoke API answers there, for function-to-function
//! calls; the admin API, queues and function routes do not. The listener lives in the
//! instance's own network namespace, so every connection comes from that instance: the caller
//! is known without a credential.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::{SharedApp, error, invoke_api};

/// Which function's instance made a request at the endpoint (a request extension).
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<str>);

pub struct InstanceEndpoint {
    router: Router,
}

impl InstanceEndpoint {
    pub fn new(app: SharedApp) -> InstanceEndpoint {
        let router = Router::new()
            .route(
                "/2015-03-31/functions/{name}/invocations",
                post(invoke_api::invoke),
            )
            .fallback(not_here)
            .with_state(app);
        InstanceEndpoint { router }
    }
}

async fn not_here() -> Response {
    error::aws_error(
        StatusCode::NOT_FOUND,
        "UnknownOperationException",
        "gust's endpoint for instances serves only the Invoke API (POST /2015-03-31/functions/NAME/invocations)",
    )
}

impl gust_executor::Endpoint for InstanceEndpoint {
    fn serve(&self, conn: tokio::net::TcpStream, function: &str) {
        let router = self
            .router
            .clone()
            .layer(axum::Extension(Caller(function.into())));
        let function = function.to_string();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(router);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("function {function}: endpoint connection: {e}");
            }
        });
    }
}
