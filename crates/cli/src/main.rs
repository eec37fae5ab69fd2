//! The `gust` command line: the server (`serve`, `dev`) and the client commands that talk to it.
//! Only this file prints errors and picks exit codes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use gust::client::{self, Client};
use gust::server::{self, ServerConfig};
use http::Method;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "gust",
    version,
    about = "Lambda on your own machines: one binary that runs functions in warm, isolated instances"
)]
struct Cli {
    /// The gust server the client commands talk to.
    #[arg(
        long,
        global = true,
        env = "GUST_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// The data dir: where `serve` keeps its state, and where client commands find the admin token.
    #[arg(long, global = true, env = "GUST_DATA_DIR", default_value = ".gust")]
    data_dir: PathBuf,
    /// The admin token (default: read from <data-dir>/admin-token).
    #[arg(long, global = true, env = "GUST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "GUST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seconds in-flight invocations get to finish at shutdown.
    #[arg(long, env = "GUST_SHUTDOWN_GRACE", default_value_t = 30)]
    shutdown_grace: u64,
    /// Run functions as plain processes, without namespaces, cgroups or seccomp.
    #[arg(long, env = "GUST_NO_SANDBOX")]
    no_sandbox: bool,
    /// Pre-warmed sandboxes kept per built-in runtime (nodejs, python) for fast cold starts.
    #[arg(long, env = "GUST_PREWARM_POOL", default_value_t = 1)]
    prewarm: usize,
    /// Seconds a connection gets to send a complete request head (from accept, or from the
    /// first byte of a later request).
    #[arg(long, env = "GUST_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request body may go without data, and the grace before --body-min-rate applies;
    /// then 408 and the connection is closed.
    #[arg(long, env = "GUST_BODY_TIMEOUT", default_value_t = 30)]
    body_timeout: u64,
    /// Bytes per second a request body must average after the --body-timeout grace (0: none).
    #[arg(long, env = "GUST_BODY_MIN_RATE", default_value_t = 16384)]
    body_min_rate: u64,
    /// Seconds a keep-alive connection may stay idle between requests.
    #[arg(long, env = "GUST_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds a connection whose client does not read its response may go without write
    /// progress; then it is closed.
    #[arg(long, env = "GUST_WRITE_TIMEOUT", default_value_t = 60)]
    write_timeout: u64,
    /// Open HTTP connections at most (default: the open-file limit minus a quarter kept for
    /// instances, the database and logs, and at most 16384).
    #[arg(long, env = "GUST_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Log lines kept per function (older ones are deleted).
    #[arg(long, env = "GUST_LOG_FUNCTION_LINES", default_value_t = 100_000)]
    log_function_lines: u64,
    /// MiB of log lines kept per function.
    #[arg(long, env = "GUST_LOG_FUNCTION_MB", default_value_t = 64)]
    log_function_mb: u64,
    /// Log lines kept in all.
    #[arg(long, env = "GUST_LOG_TOTAL_LINES", default_value_t = 200_000)]
    log_total_lines: u64,
    /// MiB of log lines kept in all.
    #[arg(long, env = "GUST_LOG_TOTAL_MB", default_value_t = 256)]
    log_total_mb: u64,
    /// Hosts, addresses or CIDR ranges that callbacks and URL destinations may reach although
    /// they are loopback, private, link-local or this host's (repeat, or separate with commas).
    #[arg(long, env = "GUST_ALLOW_CALLBACK", value_delimiter = ',')]
    allow_callback: Vec<String>,
    /// Hours finished async events and schedule runs are kept (for `gust events show`), 1 to
    /// 8760 (a year).
    #[arg(long, env = "GUST_EVENT_RETENTION", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(1..=8760))]
    event_retention: u64,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// An async call id or message id: its state, attempts and last error.
    Show { id: String },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Send one message.
    Send {
        name: String,
        /// The message body.
        #[arg(long, short)]
        data: String,
        /// A string message attribute, KEY=VALUE (repeatable).
        #[arg(long = "attr", short)]
        attributes: Vec<String>,
    },
    /// Every queue: depth, in flight, oldest message age, dead-letter queue size.
    Ls,
    /// Move a dead-letter queue's messages back to their source queue (or --to QUEUE).
    Redrive {
        dlq: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Delete every waiting message of a queue.
    Purge { name: String },
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform: HTTP routes, the Invoke API and the admin API.
    Serve(ServeArgs),
    /// Serve and deploy DIR's gust.toml in one step, and redeploy when its files change.
    Dev {
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Report which isolation and limits functions get on this host, and why.
    Doctor,
    /// Async calls and queue messages.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Queues: send, list with stats, redrive a dead-letter queue, purge.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Schedules with their last and next run and last outcome.
    Schedules,
    /// Scaffold a working function in ./NAME.
    Init {
        name: String,
        #[arg(long, default_value = "nodejs", value_parser = ["nodejs", "python"])]
        runtime: String,
    },
    /// Pack, upload and deploy the service in DIR (its gust.toml).
    Deploy {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Invoke a function through the Lambda Invoke API and print its response.
    Invoke {
        name: String,
        /// The payload: JSON text, or @FILE.
        #[arg(long, short)]
        data: Option<String>,
        /// Print the invocation's log tail (START/END/REPORT and the function's output) to stderr.
        #[arg(long)]
        log: bool,
    },
    /// List deployed functions.
    Ls,
    /// Show one function's configuration and instances.
    Describe { name: String },
    /// Print a function's logs.
    Logs {
        name: String,
        /// Keep printing new lines as they arrive.
        #[arg(long, short)]
        follow: bool,
        /// How many recent lines to print first.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
    },
    /// Remove a function, or a whole service with --service.
    Rm {
        name: Option<String>,
        #[arg(long)]
        service: Option<String>,
    },
}

fn main() {
    // A sandbox's PID 1 is this binary run as `gust-init`.
    if gust_sandbox::is_init() {
        gust_sandbox::init::main();
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn token(cli: &Cli) -> Option<String> {
    cli.token.clone().or_else(|| {
        std::fs::read_to_string(cli.data_dir.join("admin-token"))
            .ok()
            .map(|t| t.trim().to_string())
    })
}

fn client(cli: &Cli) -> Client {
    Client::new(&cli.server, token(cli))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(args) => {
            init_tracing();
            let server = start_server(&cli, args).await?;
            eprintln!("gust is listening on {}", server.url());
            wait_for_signal().await;
            eprintln!(
                "shutting down: finishing in-flight invocations (up to {} s)",
                args.shutdown_grace
            );
            server.stop().await;
            Ok(())
        }
        Command::Dev { dir, serve } => {
            init_tracing();
            let server = start_server(&cli, serve).await?;
            let c = Client::new(&server.url(), Some(server.token.clone()));
            let report = client::deploy(&c, dir, |m| eprintln!("{m}")).await;
            match report {
                Ok(r) => print_deploy(&cli, &r, true),
                Err(e) => eprintln!(
                    "error: deploy failed: {e:#}\n(the server keeps running; fix the manifest and run `gust deploy {}`)",
                    dir.display()
                ),
            }
            eprintln!(
                "gust dev is serving on {} and redeploys when {} changes — ctrl-c to stop",
                server.url(),
                dir.display()
            );
            let signal = wait_for_signal();
            tokio::pin!(signal);
            let mut seen = client::fingerprint(dir);
            loop {
                tokio::select! {
                    _ = &mut signal => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let now = client::fingerprint(dir);
                if now == seen {
                    continue;
                }
                seen = now;
                eprintln!("change in {}: redeploying", dir.display());
                match client::deploy(&c, dir, |m| eprintln!("{m}")).await {
                    Ok(r) => print_deploy(&cli, &r, false),
                    Err(e) => eprintln!(
                        "error: redeploy failed: {e:#} (still serving the previous version)"
                    ),
                }
            }
            server.stop().await;
            Ok(())
        }
        Command::Events {
            command: EventsCommand::Show { id },
        } => {
            let v = client(&cli)
                .admin(Method::GET, &format!("/events/{id}"), Bytes::new())
                .await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let ts = |k: &str| {
                v[k].as_u64()
                    .map(gust_core::time::iso8601_ms)
                    .unwrap_or_else(|| "-".into())
            };
            println!("id:          {}", v["id"].as_str().unwrap_or(""));
            println!(
                "kind:        {} {}",
                v["kind"].as_str().unwrap_or(""),
                v["target"].as_str().unwrap_or("")
            );
            println!("state:       {}", v["state"].as_str().unwrap_or(""));
            println!("attempts:    {}", v["attempts"]);
            println!("created:     {}", ts("created_ms"));
            println!("updated:     {}", ts("updated_ms"));
            if let Some(e) = v["last_error"].as_str() {
                println!("last error:  {e}");
            }
            Ok(())
        }
        Command::Queue { command } => queue_command(&cli, command).await,
        Command::Schedules => {
            let v = client(&cli)
                .admin(Method::GET, "/schedules", Bytes::new())
                .await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let list = v["schedules"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no schedules (add [[functions.NAME.schedules]] to a gust.toml)");
                return Ok(());
            }
            println!(
                "{:<28} {:<28} {:<21} {:<21} LAST OUTCOME",
                "NAME", "EXPRESSION", "NEXT", "LAST"
            );
            for s in list {
                println!(
                    "{:<28} {:<28} {:<21} {:<21} {}",
                    s["name"].as_str().unwrap_or(""),
                    format!(
                        "{} {}",
                        s["expression"].as_str().unwrap_or(""),
                        s["timezone"].as_str().filter(|t| *t != "UTC").unwrap_or("")
                    ),
                    s["next"].as_str().unwrap_or("-"),
                    s["last"].as_str().unwrap_or("-"),
                    s["last_outcome"].as_str().unwrap_or("-"),
                );
            }
            Ok(())
        }
        Command::Doctor => {
            let report = gust::doctor::report()?;
            if cli.json {
                let map: serde_json::Map<String, Value> = report
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                println!("{}", Value::Object(map));
            } else {
                for (k, v) in &report {
                    println!("{k:<16} {v}");
                }
            }
            Ok(())
        }
        Command::Init { name, runtime } => {
            let files = gust::scaffold::init(Path::new(name), name, runtime)?;
            println!("created {name}/ with {}", files.join(", "));
            println!("next: gust dev {name}    (then: curl http://127.0.0.1:8080/{name})");
            Ok(())
        }
        Command::Deploy { dir } => {
            let c = client(&cli);
            let r = client::deploy(&c, dir, |m| eprintln!("{m}")).await?;
            print_deploy(&cli, &r, false);
            Ok(())
        }
        Command::Invoke { name, data, log } => invoke(&cli, name, data.as_deref(), *log).await,
        Command::Ls => {
            let v = client(&cli)
                .admin(Method::GET, "/functions", Bytes::new())
                .await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let fs = v.as_array().cloned().unwrap_or_default();
            if fs.is_empty() {
                println!("no functions deployed (deploy one with `gust deploy DIR`)");
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:<9} {:>4} {:>5} {:>5}  URL",
                "NAME", "SERVICE", "RUNTIME", "REV", "IDLE", "BUSY"
            );
            for f in fs {
                println!(
                    "{:<24} {:<16} {:<9} {:>4} {:>5} {:>5}  {}",
                    f["name"].as_str().unwrap_or(""),
                    f["service"].as_str().unwrap_or(""),
                    f["runtime"].as_str().unwrap_or(""),
                    f["revision"].to_string(),
                    f["instances"]["idle"].to_string(),
                    f["instances"]["busy"].to_string(),
                    f["url"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Describe { name } => {
            let v = client(&cli)
                .admin(Method::GET, &format!("/functions/{name}"), Bytes::new())
                .await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let timeout = v["timeout"]
                .as_u64()
                .map(|t| format!("{t} s"))
                .unwrap_or_else(|| "3 s (default)".into());
            println!("name:        {}", v["name"].as_str().unwrap_or(""));
            println!("service:     {}", v["service"].as_str().unwrap_or(""));
            println!("runtime:     {}", v["runtime"].as_str().unwrap_or(""));
            println!("handler:     {}", v["handler"].as_str().unwrap_or(""));
            println!("memory:      {} MB", v["memory"]);
            println!("timeout:     {timeout}");
            println!(
                "revision:    {} (deployed {})",
                v["revision"],
                v["deployed_at"].as_str().unwrap_or("")
            );
            println!(
                "code:        sha256:{}",
                v["code_sha256"].as_str().unwrap_or("")
            );
            println!("url:         {}", v["url"].as_str().unwrap_or(""));
            let s = &v["scaling"];
            println!(
                "scaling:     max {} / min {} instances, idle timeout {} s, queue {} for {} s",
                s["max_instances"],
                s["min_instances"],
                s["idle_timeout"],
                s["queue_length"],
                s["queue_timeout"]
            );
            for r in v["routes"].as_array().into_iter().flatten() {
                println!(
                    "route:       {} {}",
                    r["method"].as_str().unwrap_or(""),
                    r["path"].as_str().unwrap_or("")
                );
            }
            let i = &v["instances"];
            println!(
                "instances:   {} idle, {} busy, {} starting, {} waiting; {} invocations, {} cold starts, {} throttled",
                i["idle"],
                i["busy"],
                i["starting"],
                i["waiting"],
                i["invocations"],
                i["cold_starts"],
                i["throttles"]
            );
            Ok(())
        }
        Command::Logs {
            name,
            follow,
            lines,
        } => {
            let c = client(&cli);
            let mut v = c
                .admin(
                    Method::GET,
                    &format!("/functions/{name}/logs?limit={lines}"),
                    Bytes::new(),
                )
                .await?;
            loop {
                for l in v["logs"].as_array().into_iter().flatten() {
                    if cli.json {
                        println!("{l}");
                    } else {
                        let rid = l["request_id"]
                            .as_str()
                            .map(|r| &r[..r.len().min(8)])
                            .unwrap_or("-");
                        println!(
                            "{} {:<8} {:<8} {}",
                            gust_core::time::iso8601_ms(l["ts_ms"].as_u64().unwrap_or(0)),
                            rid,
                            l["stream"].as_str().unwrap_or(""),
                            l["line"].as_str().unwrap_or("")
                        );
                    }
                }
                if !follow {
                    return Ok(());
                }
                let after = v["next"]
                    .as_i64()
                    .map(|n| format!("&after={n}"))
                    .unwrap_or_default();
                v = c
                    .admin(
                        Method::GET,
                        &format!("/functions/{name}/logs?wait=25&limit=1000{after}"),
                        Bytes::new(),
                    )
                    .await?;
            }
        }
        Command::Rm { name, service } => {
            let c = client(&cli);
            let v = match (name, service) {
                (Some(n), None) => {
                    c.admin(Method::DELETE, &format!("/functions/{n}"), Bytes::new())
                        .await?
                }
                (None, Some(s)) => {
                    c.admin(Method::DELETE, &format!("/services/{s}"), Bytes::new())
                        .await?
                }
                _ => bail!("say what to remove: `gust rm NAME` or `gust rm --service SERVICE`"),
            };
            if cli.json {
                print_json(&v);
            } else {
                let names: Vec<&str> = v["removed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str())
                    .collect();
                println!(
                    "removed {}",
                    if names.is_empty() {
                        "nothing".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            }
            Ok(())
        }
    }
}

async fn start_server(cli: &Cli, args: &ServeArgs) -> anyhow::Result<server::Server> {
    let server = server::start(ServerConfig {
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        sandbox: !args.no_sandbox,
        prewarm: args.prewarm,
        http: gust_gateway::listener::Limits {
            header_timeout: Duration::from_secs(args.header_timeout),
            body_timeout: Duration::from_secs(args.body_timeout),
            body_min_rate: args.body_min_rate,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            write_timeout: Duration::from_secs(args.write_timeout),
            max_connections: args.max_connections,
        },
        logs: gust_store::LogLimits {
            function_lines: args.log_function_lines,
            function_bytes: args.log_function_mb << 20,
            total_lines: args.log_total_lines,
            total_bytes: args.log_total_mb << 20,
        },
        allow_callback: args.allow_callback.clone(),
        event_retention: Duration::from_secs(
            args.event_retention
                .checked_mul(3600)
                .context("--event-retention is too large")?,
        ),
        ..ServerConfig::new(args.listen, cli.data_dir.clone())
    })
    .await?;
    if server.token_created {
        eprintln!(
            "admin token (shown once; stored in {} with mode 0600):\n  {}",
            server.data_dir.join("admin-token").display(),
            server.token
        );
    }
    if server.functions_restored > 0 {
        eprintln!(
            "restored {} function(s) from {}",
            server.functions_restored,
            server.data_dir.display()
        );
    }
    Ok(server)
}

async fn queue_command(cli: &Cli, command: &QueueCommand) -> anyhow::Result<()> {
    let c = client(cli);
    let v = match command {
        QueueCommand::Send {
            name,
            data,
            attributes,
        } => {
            let mut attrs = serde_json::Map::new();
            for a in attributes {
                let Some((k, val)) = a.split_once('=') else {
                    bail!("--attr {a:?}: use KEY=VALUE");
                };
                attrs.insert(
                    k.to_string(),
                    serde_json::json!({"stringValue": val, "dataType": "String"}),
                );
            }
            let body = serde_json::json!({"body": data, "attributes": attrs});
            c.admin(
                Method::POST,
                &format!("/queues/{name}/messages"),
                Bytes::from(body.to_string()),
            )
            .await?
        }
        QueueCommand::Ls => c.admin(Method::GET, "/queues", Bytes::new()).await?,
        QueueCommand::Redrive { dlq, to } => {
            let q = to.as_ref().map(|t| format!("?to={t}")).unwrap_or_default();
            c.admin(
                Method::POST,
                &format!("/queues/{dlq}/redrive{q}"),
                Bytes::new(),
            )
            .await?
        }
        QueueCommand::Purge { name } => {
            c.admin(Method::POST, &format!("/queues/{name}/purge"), Bytes::new())
                .await?
        }
    };
    if cli.json {
        print_json(&v);
        return Ok(());
    }
    match command {
        QueueCommand::Send { name, .. } => {
            println!("sent {} to {name}", v["ids"][0].as_str().unwrap_or(""))
        }
        QueueCommand::Ls => {
            let qs = v["queues"].as_array().cloned().unwrap_or_default();
            if qs.is_empty() {
                println!("no queues (declare one with [queues.NAME] in a gust.toml)");
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:>7} {:>9} {:>12}  DLQ",
                "NAME", "SERVICE", "DEPTH", "IN FLIGHT", "OLDEST (s)"
            );
            for q in qs {
                let dlq = match q["dead_letter_queue"].as_str() {
                    Some(d) => format!("{d} ({} messages)", q["dlq_size"]),
                    None => "-".into(),
                };
                println!(
                    "{:<24} {:<16} {:>7} {:>9} {:>12}  {dlq}",
                    q["name"].as_str().unwrap_or(""),
                    q["service"].as_str().unwrap_or(""),
                    q["depth"],
                    q["in_flight"],
                    q["oldest_age_ms"]
                        .as_u64()
                        .map(|m| format!("{:.1}", m as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
        QueueCommand::Redrive { dlq, .. } => println!("moved {} messages out of {dlq}", v["moved"]),
        QueueCommand::Purge { name } => println!("purged {} messages from {name}", v["purged"]),
    }
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn print_deploy(cli: &Cli, r: &Value, curl: bool) {
    if cli.json {
        print_json(r);
        return;
    }
    let service = r["service"].as_str().unwrap_or("");
    println!("deployed service {service}:");
    for f in r["functions"].as_array().into_iter().flatten() {
        let url = f["url"].as_str().unwrap_or("");
        println!(
            "  {:<20} rev {:<3} {}",
            f["name"].as_str().unwrap_or(""),
            f["revision"],
            url
        );
        for route in f["routes"].as_array().into_iter().flatten() {
            println!(
                "  {:<20}         route {}",
                "",
                route.as_str().unwrap_or("")
            );
        }
        let (min, started) = (
            f["min_instances"].as_u64().unwrap_or(0),
            f["min_instances_started"].as_u64().unwrap_or(0),
        );
        if min > 0 {
            println!("  {:<20}         {started}/{min} min instances started", "");
        }
        if curl {
            println!("  try: curl -s {url}/");
        }
    }
    for n in r["removed"].as_array().into_iter().flatten() {
        println!("  removed {}", n.as_str().unwrap_or(""));
    }
}

async fn invoke(cli: &Cli, name: &str, data: Option<&str>, log: bool) -> anyhow::Result<()> {
    let payload = match data {
        None => Bytes::from_static(b"{}"),
        Some(d) if d.starts_with('@') => Bytes::from(
            std::fs::read(&d[1..]).with_context(|| format!("read the payload file {}", &d[1..]))?,
        ),
        Some(d) => Bytes::from(d.to_string()),
    };
    if serde_json::from_slice::<Value>(&payload).is_err() {
        bail!(
            "the payload is not JSON: pass --data '{{\"key\": \"value\"}}' or --data @event.json"
        );
    }
    let c = client(cli);
    let mut headers = vec![("content-type", "application/json")];
    if log {
        headers.push(("x-amz-log-type", "Tail"));
    }
    let r = c
        .request(
            Method::POST,
            &format!("/2015-03-31/functions/{name}/invocations"),
            &headers,
            payload,
        )
        .await?;
    let function_error = r
        .headers
        .get("x-amz-function-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let log_text = r
        .headers
        .get("x-amz-log-result")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if !r.status.is_success() {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
        let kind = r
            .headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("error");
        bail!("{kind}: {msg} ({})", r.status);
    }
    if cli.json {
        let payload: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
        print_json(&serde_json::json!({
            "StatusCode": r.status.as_u16(),
            "FunctionError": function_error,
            "ExecutedVersion": r.headers.get("x-amz-executed-version").and_then(|v| v.to_str().ok()),
            "Payload": payload,
            "Log": log_text,
        }));
    } else {
        if let Some(l) = &log_text {
            eprint!("{l}");
        }
        println!("{}", String::from_utf8_lossy(&r.body));
    }
    if let Some(e) = function_error {
        bail!("function {name} failed ({e})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_retention_is_between_an_hour_and_a_year() {
        let parse = |v: &str| Cli::try_parse_from(["gust", "serve", "--event-retention", v]);
        for bad in ["0", "8761", "18446744073709551615", "-1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for good in ["1", "24", "8760"] {
            assert!(parse(good).is_ok(), "{good}");
        }
    }
}
