//! gust-gateway
