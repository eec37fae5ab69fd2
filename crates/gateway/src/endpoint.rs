//! gust's endpoint for instances: what a function's code reaches at `127.0.0.1:9002` inside
//! its sandbox (`GUST_ENDPOINT_URL`), the one address of gust an instance can connect to
//! (docs/SANDBOX.md, "Network"). Only the Invoke API answers there, for function-to-function
//! calls; the admin API, queues and function routes do not. The listener lives in the
//! instance's own network namespace, so every connection comes from that instance: the caller
//! is known without a credential.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;

use crate::{SharedApp, error, invoke_api, listener};

/// Connections one instance may hold open to the endpoint (each may carry a 6 MB payload).
const MAX_CONNECTIONS: usize = 16;

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
    fn serve(
        &self,
        listener: tokio::net::TcpListener,
        function: &str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let router = self
            .router
            .clone()
            .layer(axum::Extension(Caller(function.into())));
        let function = function.to_string();
        // The public listener's limits (header, body and idle timeouts, minimum body rate),
        // and few connections: one instance runs one invocation at a time.
        let limits = listener::Limits {
            max_connections: Some(MAX_CONNECTIONS),
            ..listener::Limits::default()
        };
        Box::pin(async move {
            let stats = Arc::new(listener::Stats::default());
            if let Err(e) =
                listener::serve(listener, router, limits, stats, std::future::pending()).await
            {
                tracing::debug!("function {function}: endpoint: {e}");
            }
        })
    }
}
