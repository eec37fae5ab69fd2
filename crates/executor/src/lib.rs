//! gust-executor
