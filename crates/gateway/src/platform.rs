//! The platform's control plane on one node: deploys and removals update the store, the live
//! pools and the route table together. Used by the admin API and at start-up (restore).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use gust_core::FunctionVersion;
use gust_pool::Pools;
use gust_store::{Store, StoredFunction};
use serde::Serialize;

use crate::error::ApiError;
use crate::routes::RouteTable;

pub struct Platform {
    pub store: Arc<Store>,
    pub pools: Arc<Pools>,
    routes: RwLock<Arc<RouteTable>>,
    /// Serialises deploys and removals so that the store, pools and routes change together.
    deploy_lock: tokio::sync::Mutex<()>,
    /// Where URL destinations may point (checked at deploy, and again at each delivery).
    outbound: Arc<gust_events::Outbound>,
}

#[derive(Debug, Serialize)]
pub struct DeployedFunction {
    pub name: String,
    pub revision: u64,
    pub min_instances: u32,
    pub min_instances_started: usize,
    pub routes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub service: String,
    pub functions: Vec<DeployedFunction>,
    pub removed: Vec<String>,
}

impl Platform {
    pub fn new(
        store: Arc<Store>,
        pools: Arc<Pools>,
        outbound: Arc<gust_events::Outbound>,
    ) -> Arc<Platform> {
        Arc::new(Platform {
            store,
            pools,
            routes: RwLock::new(Arc::new(RouteTable::default())),
            deploy_lock: tokio::sync::Mutex::new(()),
            outbound,
        })
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn rebuild_routes(&self) {
        let pools = self.pools.all();
        let table = RouteTable::new(pools.iter().map(|p| {
            let s = &p.function().spec;
            (s.name.as_str(), s.routes.as_slice())
        }));
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    fn version(&self, f: &StoredFunction) -> Result<Arc<FunctionVersion>, ApiError> {
        Ok(Arc::new(FunctionVersion {
            spec: f.spec.clone(),
            revision: f.revision,
            code_sha256: f.code_sha256.clone(),
            code_dir: self.store.code_dir(&f.code_sha256)?,
        }))
    }

    /// Brings every stored function back after a restart (minimum instances warm up in the
    /// background).
    pub async fn restore(&self) -> Result<usize, ApiError> {
        let _guard = self.deploy_lock.lock().await;
        let functions = self.store.functions()?;
        let mut pools = Vec::new();
        for f in &functions {
            match self.version(f) {
                Ok(v) => pools.push(self.pools.deploy(v)),
                Err(e) => tracing::error!("cannot restore function {}: {e:?}", f.spec.name),
            }
        }
        self.rebuild_routes();
        // Warm the minimum instances in the background: the server serves at once, and a
        // request that comes first simply cold-starts.
        for p in pools {
            tokio::spawn(async move { p.start_min().await });
        }
        Ok(functions.len())
    }

    /// Deploys a whole service from its manifest text and the code hash of each function.
    pub async fn deploy(
        &self,
        file: &str,
        manifest_text: &str,
        code: &HashMap<String, String>,
    ) -> Result<DeployReport, ApiError> {
        let manifest = gust_manifest::parse(file, manifest_text)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut specs = Vec::new();
        for f in &manifest.functions {
            let sha = code.get(&f.spec.name).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "no code bundle for function {}: add \"{}\": \"<sha256>\" to \"code\"",
                    f.spec.name, f.spec.name
                ))
            })?;
            specs.push((f.spec.clone(), sha.clone()));
        }
        let _guard = self.deploy_lock.lock().await;
        // Routes must not collide with another service's.
        let table = self.routes();
        for (spec, _) in &specs {
            for r in &spec.routes {
                if let Some(owner) = table.owner(&r.method, &r.path)
                    && self
                        .store
                        .function(owner)?
                        .is_some_and(|o| o.spec.service != manifest.service)
                {
                    return Err(ApiError::Conflict(format!(
                        "route {} {} of function {} is already served by function {owner} of another service: choose another path",
                        r.method, r.path, spec.name
                    )));
                }
            }
        }
        // Every queue a function names must exist: declared here, or by a service deployed
        // before.
        let mut known: std::collections::HashSet<String> =
            self.store.queues()?.into_iter().map(|q| q.name).collect();
        known.extend(manifest.queues.iter().map(|q| q.name.clone()));
        let check = |what: String, q: &str| -> Result<(), ApiError> {
            if known.contains(q) {
                Ok(())
            } else {
                Err(ApiError::BadRequest(format!(
                    "{what} names queue {q}, which no service declares: add [queues.{q}] to gust.toml"
                )))
            }
        };
        for (spec, _) in &specs {
            let a = &spec.async_config;
            if let Some(q) = &a.dead_letter_queue {
                check(
                    format!("[functions.{}.async] dead_letter_queue", spec.name),
                    q,
                )?;
            }
            for d in [&a.on_success, &a.on_failure].into_iter().flatten() {
                if let gust_core::Destination::Queue(q) = d {
                    check(format!("[functions.{}.async] destination", spec.name), q)?;
                }
            }
            for sub in &spec.subscriptions {
                check(
                    format!("[[functions.{}.subscriptions]]", spec.name),
                    &sub.queue,
                )?;
            }
            for sch in &spec.schedules {
                if let Some(q) = &sch.dead_letter_queue {
                    check(format!("schedule {}", sch.name), q)?;
                }
            }
        }
        for q in &manifest.queues {
            if q.dead_letter_queue.as_deref() == Some(q.name.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "[queues.{}] dead_letter_queue names the queue itself: declare another queue for its dead letters",
                    q.name
                )));
            }
            if let Some(d) = &q.dead_letter_queue {
                check(format!("[queues.{}] dead_letter_queue", q.name), d)?;
            }
        }
        // Dead letters must end somewhere: no chain of dead-letter queues may come back to a
        // queue it started from (this service's queues replace what it declared before).
        let mut dlq: HashMap<String, String> = self
            .store
            .queues()?
            .into_iter()
            .filter(|q| q.service != manifest.service)
            .filter_map(|q| Some((q.name, q.dead_letter_queue?)))
            .collect();
        dlq.extend(
            manifest
                .queues
                .iter()
                .filter_map(|q| Some((q.name.clone(), q.dead_letter_queue.clone()?))),
        );
        for q in &manifest.queues {
            if let Some(cycle) = dlq_cycle(&dlq, &q.name) {
                return Err(ApiError::BadRequest(format!(
                    "[queues.{}] dead_letter_queue: {} is a cycle (a dead letter would go round it forever): end the chain at a queue with no dead_letter_queue",
                    q.name,
                    cycle.join(" → ")
                )));
            }
        }
        // Function destinations must end somewhere too: A → B → A would pass records round
        // for ever (this service's functions replace what it deployed before).
        let mut next: HashMap<String, Vec<String>> = HashMap::new();
        let ours = specs.iter().map(|(s, _)| s.clone());
        let theirs = self
            .store
            .functions()?
            .into_iter()
            .filter(|f| f.spec.service != manifest.service)
            .map(|f| f.spec);
        // Ours last: a name this service deploys is this service's.
        for spec in theirs.chain(ours) {
            let a = &spec.async_config;
            let to = [&a.on_success, &a.on_failure]
                .into_iter()
                .flatten()
                .filter_map(|d| match d {
                    gust_core::Destination::Function(f) => Some(f.clone()),
                    _ => None,
                })
                .collect();
            next.insert(spec.name.clone(), to);
        }
        for (spec, _) in &specs {
            if let Some(cycle) = destination_cycle(&next, &spec.name) {
                return Err(ApiError::BadRequest(format!(
                    "[functions.{}.async] on_success/on_failure: {} is a cycle of function destinations (an invocation record would go round it forever): end the chain at a function without a function destination",
                    spec.name,
                    cycle.join(" → ")
                )));
            }
        }
        // URL destinations: only where a callback may go (not this host, not a private
        // network, not gust's own API, unless the operator allows it).
        for (spec, _) in &specs {
            let a = &spec.async_config;
            for (key, d) in [("on_success", &a.on_success), ("on_failure", &a.on_failure)] {
                if let Some(gust_core::Destination::Url(u)) = d
                    && let Err(why) = self.outbound.check(u).await
                {
                    use gust_events::outbound::Refusal;
                    let field = format!("[functions.{}.async] {key} = {u:?}", spec.name);
                    return Err(match why {
                        Refusal::Unresolved(m) => ApiError::BadRequest(format!(
                            "{field}: the host name did not resolve now ({m}); deploy again once it resolves"
                        )),
                        Refusal::Busy => ApiError::Unavailable(format!(
                            "{field}: too many host lookups in progress; retry the deploy"
                        )),
                        Refusal::Platform(m) => ApiError::Platform(format!("{field}: {m}")),
                        other => ApiError::BadRequest(format!("{field}: {other}")),
                    });
                }
            }
        }
        // Unpack every bundle before anything is recorded, so a failure leaves the store and
        // the running pools as they were.
        for (_, sha) in &specs {
            self.store.code_dir(sha)?;
        }
        self.store.set_queues(&manifest.service, &manifest.queues)?;
        let (stored, removed) =
            self.store
                .deploy_service(&manifest.service, manifest_text, &specs)?;
        let mut report = DeployReport {
            service: manifest.service.clone(),
            functions: Vec::new(),
            removed: removed.clone(),
        };
        // New versions warm their minimum instances before they take traffic, so a redeploy
        // never makes callers wait for a cold start that could have been done ahead.
        let mut prepared = Vec::new();
        for f in &stored {
            let pool = self.pools.prepare(self.version(f)?);
            let started = pool.start_min().await;
            report.functions.push(DeployedFunction {
                name: f.spec.name.clone(),
                revision: f.revision,
                min_instances: f.spec.scaling.min_instances,
                min_instances_started: started,
                routes: f
                    .spec
                    .routes
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect(),
            });
            prepared.push(pool);
        }
        for pool in prepared {
            self.pools.activate(pool);
        }
        for name in &removed {
            self.pools.remove(name);
        }
        self.rebuild_routes();
        Ok(report)
    }

    pub async fn remove_function(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.deploy_lock.lock().await;
        if !self.store.remove_function(name)? {
            return Err(ApiError::NotFound(format!(
                "function {name} is not deployed (see `gust ls`)"
            )));
        }
        self.pools.remove(name);
        self.rebuild_routes();
        Ok(())
    }

    pub async fn remove_service(&self, service: &str) -> Result<Vec<String>, ApiError> {
        let _guard = self.deploy_lock.lock().await;
        let Some(names) = self.store.remove_service(service)? else {
            return Err(ApiError::NotFound(format!(
                "service {service} is not deployed (see `gust ls`)"
            )));
        };
        for n in &names {
            self.pools.remove(n);
        }
        self.rebuild_routes();
        Ok(names)
    }
}

/// The dead-letter chain from `start`, when it comes back to a queue already on it: the queues
/// in order, the repeated one last.
fn dlq_cycle(dlq: &HashMap<String, String>, start: &str) -> Option<Vec<String>> {
    let mut chain = vec![start.to_string()];
    let mut at = start;
    while let Some(next) = dlq.get(at) {
        let seen = chain.iter().any(|q| q == next);
        chain.push(next.clone());
        if seen {
            return Some(chain);
        }
        at = next;
    }
    None
}

/// A cycle of function destinations reachable from `start`: the functions in order, the
/// repeated one last.
fn destination_cycle(next: &HashMap<String, Vec<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        next: &HashMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::HashSet<String>,
    ) -> Option<Vec<String>> {
        let at = path.last()?.clone();
        for to in next.get(&at).into_iter().flatten() {
            if path.contains(to) {
                let mut cycle = path.clone();
                cycle.push(to.clone());
                return Some(cycle);
            }
            if done.contains(to) {
                continue;
            }
            path.push(to.clone());
            if let Some(c) = walk(next, path, done) {
                return Some(c);
            }
            path.pop();
        }
        done.insert(at);
        None
    }
    walk(
        next,
        &mut vec![start.to_string()],
        &mut std::collections::HashSet::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_destination_cycles_are_found() {
        let graph = |pairs: &[(&str, &[&str])]| -> HashMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        let own = graph(&[("a", &["a"])]);
        assert_eq!(destination_cycle(&own, "a").unwrap(), ["a", "a"]);
        let two = graph(&[("a", &["b"]), ("b", &["c", "a"])]);
        assert_eq!(destination_cycle(&two, "a").unwrap(), ["a", "b", "a"]);
        // Success to one function, failure to another: either may close the loop.
        let fork = graph(&[("a", &["x", "b"]), ("b", &["a"]), ("x", &[])]);
        assert_eq!(destination_cycle(&fork, "a").unwrap(), ["a", "b", "a"]);
        // A diamond is not a cycle.
        let diamond = graph(&[("a", &["b", "c"]), ("b", &["d"]), ("c", &["d"])]);
        assert_eq!(destination_cycle(&diamond, "a"), None);
        assert_eq!(destination_cycle(&diamond, "z"), None);
    }

    #[test]
    fn dead_letter_cycles_are_found() {
        let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let two = map(&[("a", "b"), ("b", "a")]);
        assert_eq!(dlq_cycle(&two, "a").unwrap(), ["a", "b", "a"]);
        let three = map(&[("a", "b"), ("b", "c"), ("c", "a")]);
        assert_eq!(dlq_cycle(&three, "b").unwrap(), ["b", "c", "a", "b"]);
        // A chain into a cycle it is not part of is reported too.
        let tail = map(&[("x", "a"), ("a", "b"), ("b", "a")]);
        assert_eq!(dlq_cycle(&tail, "x").unwrap(), ["x", "a", "b", "a"]);
        let chain = map(&[("a", "b"), ("b", "c")]);
        assert_eq!(dlq_cycle(&chain, "a"), None);
        assert_eq!(dlq_cycle(&chain, "z"), None);
    }
}
