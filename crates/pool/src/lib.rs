//! gust-pool
