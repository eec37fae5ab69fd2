//! The HTTP routes of deployed functions: `GET /users/{id}`, `ANY /files/{proxy+}`. The table is
//! rebuilt on every deploy and swapped whole; matching picks the most specific route (exact
//! method over ANY, then more literal segments, then no greedy tail), as API Gateway does.

use std::collections::BTreeMap;

use gust_core::Route;

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Lit(String),
    Param(String),
    Greedy(String),
}

#[derive(Debug, Clone)]
struct Compiled {
    method: String,
    path: String,
    segs: Vec<Seg>,
    function: String,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Compiled>,
}

/// A matched route.
#[derive(Debug, PartialEq)]
pub struct Matched<'a> {
    pub function: &'a str,
    /// `GET /users/{id}`
    pub route_key: String,
    pub params: BTreeMap<String, String>,
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.trim_start_matches('/').split('/')
}

impl RouteTable {
    pub fn new<'a>(functions: impl IntoIterator<Item = (&'a str, &'a [Route])>) -> RouteTable {
        let mut routes = Vec::new();
        for (function, rs) in functions {
            for r in rs {
                let segs = split(&r.path)
                    .map(
                        |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                            Some(p) => match p.strip_suffix('+') {
                                Some(g) => Seg::Greedy(g.to_string()),
                                None => Seg::Param(p.to_string()),
                            },
                            None => Seg::Lit(s.to_string()),
                        },
                    )
                    .collect();
                routes.push(Compiled {
                    method: r.method.clone(),
                    path: r.path.clone(),
                    segs,
                    function: function.to_string(),
                });
            }
        }
        // A stable order, whatever order the pools came in: ties go the same way every time.
        routes.sort_by(|a, b| {
            (&a.path, &a.method, &a.function).cmp(&(&b.path, &b.method, &b.function))
        });
        RouteTable { routes }
    }

    /// Which function, if any, claims this method and path already. Paths compare by shape:
    /// `/users/{id}` and `/users/{uid}` are the same route.
    pub fn owner(&self, method: &str, path: &str) -> Option<&str> {
        let shape = gust_manifest::route_shape(path);
        self.routes
            .iter()
            .find(|r| r.method == method && gust_manifest::route_shape(&r.path) == shape)
            .map(|r| r.function.as_str())
    }

    pub fn find(&self, method: &str, path: &str) -> Option<Matched<'_>> {
        let parts: Vec<&str> = split(path).collect();
        // (exact method, literal segments, no greedy tail): higher is more specific.
        type Score = (bool, usize, bool);
        let mut best: Option<(Score, &Compiled, BTreeMap<String, String>)> = None;
        for r in &self.routes {
            let exact_method = r.method == method || (method == "HEAD" && r.method == "GET");
            if !exact_method && r.method != "ANY" {
                continue;
            }
            let Some(params) = match_segs(&r.segs, &parts) else {
                continue;
            };
            let literals = r.segs.iter().filter(|s| matches!(s, Seg::Lit(_))).count();
            let no_greedy = !matches!(r.segs.last(), Some(Seg::Greedy(_)));
            let score = (exact_method, literals, no_greedy);
            if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
                best = Some((score, r, params));
            }
        }
        best.map(|(_, r, params)| Matched {
            function: &r.function,
            route_key: format!("{} {}", r.method, r.path),
            params,
        })
    }
}

fn match_segs(segs: &[Seg], parts: &[&str]) -> Option<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    for (i, seg) in segs.iter().enumerate() {
        match seg {
            Seg::Greedy(name) => {
                let rest = parts.get(i..)?.join("/");
                if rest.is_empty() {
                    return None;
                }
                params.insert(name.clone(), decode(&rest));
                return Some(params);
            }
            Seg::Lit(l) => {
                if parts.get(i)? != l {
                    return None;
                }
            }
            Seg::Param(name) => {
                let p = parts.get(i)?;
                if p.is_empty() {
                    return None;
                }
                params.insert(name.clone(), decode(p));
            }
        }
    }
    (parts.len() == segs.len()).then_some(params)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: &str, path: &str) -> Route {
        Route {
            method: method.into(),
            path: path.into(),
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let a = [r("GET", "/users/{id}"), r("ANY", "/files/{proxy+}")];
        let b = [
            r("GET", "/users/me"),
            r("ANY", "/users/{id}"),
            r("GET", "/"),
        ];
        let t = RouteTable::new([("a", &a[..]), ("b", &b[..])]);
        let m = t.find("GET", "/users/42").unwrap();
        assert_eq!((m.function, m.route_key.as_str()), ("a", "GET /users/{id}"));
        assert_eq!(m.params["id"], "42");
        assert_eq!(t.find("GET", "/users/me").unwrap().function, "b");
        assert_eq!(t.find("POST", "/users/42").unwrap().function, "b");
        let m = t.find("PUT", "/files/a/b%20c").unwrap();
        assert_eq!(m.params["proxy"], "a/b c");
        assert!(t.find("GET", "/files").is_none());
        assert!(t.find("GET", "/users/1/x").is_none());
        assert_eq!(t.find("GET", "/").unwrap().function, "b");
        assert_eq!(t.owner("GET", "/users/me"), Some("b"));
        assert_eq!(
            t.owner("GET", "/users/{uid}"),
            Some("a"),
            "parameter names do not matter"
        );
    }
}
