use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

const GOOD: &str = r#"
[runtime]
workers = 2
plugin_deadline = "5ms"
plugin_memory = "16MiB"

[[frontend]]
name = "web"
listen = "127.0.0.1:8080"
pool = "web"
idle_timeout = "30s"
tcp_reset = true

[[pool]]
name = "web"
balancer = "stock:round-robin"
allow_hairpin = true
backends = [ { address = "127.0.0.1:9001", weight = 3 }, { address = "127.0.0.1:9002" } ]
"#;

#[test]
fn a_good_config_reads_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.runtime.workers, 2);
    assert_eq!(c.runtime.plugin_deadline, Duration::from_millis(5));
    assert_eq!(c.runtime.plugin_memory, 16 << 20);
    let f = &c.frontends[0];
    assert_eq!((f.idle_timeout, f.tcp_reset, f.max_flows), (Duration::from_secs(30), true, DEFAULT_MAX_FLOWS));
    let p = c.pool("web").unwrap();
    assert_eq!(p.balancer, PluginRef::Stock("round-robin".into()));
    assert_eq!(p.balancer_config, r#"{"allow_hairpin":true}"#);
    assert_eq!(p.backends[0].weight, 3);
    assert_eq!(p.backends[1].weight, 100);
    assert_eq!(p.on_all_down, OnAllDown::KeepFlows);
}

fn error_of(text: &str) -> ConfigError {
    match parse(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e,
    }
}

#[test]
fn unknown_key_names_line_and_key() {
    let e = error_of(&GOOD.replace("tcp_reset = true", "tcp_reset = true\ntcp_rest = false"));
    assert_eq!(e.line, Some(13), "{e}");
    assert_eq!(e.key, "frontend.tcp_rest", "{e}");
    assert!(e.to_string().starts_with("test.toml:13: key `frontend.tcp_rest`: unknown field"), "{e}");
}

#[test]
fn bad_address_names_line_and_key() {
    let e = error_of(&GOOD.replace("127.0.0.1:9002", "127.0.0.1:99999"));
    assert_eq!(e.line, Some(18), "{e}");
    assert_eq!(e.key, "pool.backends.address", "{e}");
    assert!(e.message.contains("expected ip:port"), "{e}");
    let e = error_of(&GOOD.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\""));
    assert_eq!((e.line, e.key.as_str()), (Some(9), "frontend.listen"), "{e}");
}

#[test]
fn unknown_pool_names_line_and_key() {
    let e = error_of(&GOOD.replace("pool = \"web\"", "pool = \"webb\""));
    assert_eq!((e.line, e.key.as_str()), (Some(10), "frontend.pool"), "{e}");
    assert!(e.message.contains("no pool named `webb` (pools: web)"), "{e}");
}

#[test]
fn missing_plugin_file_and_unknown_stock_plugin() {
    let e = error_of(&GOOD.replace("stock:round-robin", "plugins/nope.wasm"));
    assert_eq!((e.line, e.key.as_str()), (Some(16), "pool.balancer"), "{e}");
    assert!(e.message.contains("nope.wasm does not exist"), "{e}");
    // Which stock plugins exist is the loader's to say (`server::check` names the line).
    parse(&GOOD.replace("stock:round-robin", "stock:random")).unwrap();
    let e = error_of(&GOOD.replace("stock:round-robin", "stock:"));
    assert_eq!((e.line, e.key.as_str()), (Some(16), "pool.balancer"), "{e}");
}

#[test]
fn ranges_and_duplicates_are_checked() {
    let e = error_of(&GOOD.replace("weight = 3", "weight = 300"));
    assert_eq!((e.line, e.key.as_str()), (Some(18), "pool.backends.weight"), "{e}");
    let e = error_of(&GOOD.replace("workers = 2", "workers = 0"));
    assert_eq!((e.line, e.key.as_str()), (Some(3), "runtime.workers"), "{e}");
    let e = error_of(&GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001"));
    assert!(e.message.contains("listed twice"), "{e}");
    let e = error_of(&GOOD.replace("idle_timeout = \"30s\"", "idle_timeout = \"soon\""));
    assert_eq!((e.line, e.key.as_str()), (Some(11), "frontend.idle_timeout"), "{e}");
    let e = error_of(
        &GOOD
            .replace("backends = [", "backends = [] #")
            .replace("{ address = \"127.0.0.1:9001\", weight = 3 }, { address = \"127.0.0.1:9002\" } ]", ""),
    );
    assert!(e.message.contains("at least one backend"), "{e}");
}

#[test]
fn probes_and_signals_read_with_defaults_and_checks() {
    let with_probe = format!(
        "{GOOD}\n[pool.probe]\nprotocol = \"http\"\nport = 9101\npath = \"/health\"\ninterval = \"2s\"\n\n[[pool.signal]]\nprotocol = \"http\"\npath = \"/load\"\nhealth = \"stock:http-status\"\n"
    );
    let c = parse(&with_probe).unwrap();
    let p = c.pool("web").unwrap();
    let probe = p.probe.as_ref().unwrap();
    assert_eq!(
        (probe.port, probe.interval, probe.timeout, probe.threshold),
        (Some(9101), Duration::from_secs(2), Duration::from_secs(2), 2)
    );
    assert_eq!(probe.health, PluginRef::Stock("http-200".into()));
    assert!(probe.tls.verify);
    assert_eq!(p.signals.len(), 1);
    assert_eq!(p.signals[0].interval, DEFAULT_PROBE_INTERVAL);

    let e = error_of(&with_probe.replace("interval = \"2s\"", "interval = \"2s\"\ntimeout = \"3s\""));
    assert_eq!(e.key, "pool.probe.timeout", "{e}");
    assert!(e.message.contains("longer than the interval"), "{e}");
    let e = error_of(&with_probe.replace("path = \"/load\"\n", ""));
    assert_eq!(e.key, "pool.signal.path", "{e}");
    let e = error_of(&with_probe.replace("path = \"/health\"", "path = \"health\""));
    assert_eq!((e.key.as_str(), e.line), ("pool.probe.path", Some(23)), "{e}");
    let e = error_of(&with_probe.replace("port = 9101", "port = 9101\ntls_ca_file = \"missing.pem\""));
    assert!(e.message.contains("missing.pem does not exist"), "{e}");
}

/// Each error that was once reported at line 1 (no span) names its own line
/// and key now.
#[test]
fn errors_once_at_line_one_name_their_line_and_key() {
    let cases = [
        (GOOD.replace("plugin_deadline = \"5ms\"", "plugin_deadline = \"0s\""), 4, "runtime.plugin_deadline"),
        (GOOD.replace("plugin_memory = \"16MiB\"", "plugin_memory = \"64KiB\""), 5, "runtime.plugin_memory"),
        (
            format!("{GOOD}\n[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:8081\"\npool = \"web\"\n"),
            21,
            "frontend.name",
        ),
        (
            format!("{GOOD}\n[[pool]]\nname = \"web\"\nbackends = [ {{ address = \"127.0.0.1:9003\" }} ]\n"),
            21,
            "pool.name",
        ),
        (
            format!("{GOOD}\n[[frontend]]\nname = \"web2\"\nlisten = \"127.0.0.1:8080\"\npool = \"web\"\n"),
            22,
            "frontend.listen",
        ),
        // A duration's own line, not its frontend's name's.
        (GOOD.replace("idle_timeout = \"30s\"", "idle_timeout = \"0s\""), 11, "frontend.idle_timeout"),
    ];
    for (text, line, key) in cases {
        let e = error_of(&text);
        assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{e}");
    }
    // The same address on another protocol is no clash.
    let udp = format!(
        "{GOOD}\n[[frontend]]\nname = \"dns\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"udp\"\npool = \"web\"\n"
    );
    parse(&udp).unwrap();
}

/// Keys are found from the parser's spans, not by scanning lines: a
/// multi-line array, or a line that looks like a table header inside a
/// multi-line string, does not fool it.
#[test]
fn keys_are_found_in_multi_line_arrays_and_past_header_lookalikes() {
    let text = GOOD.replace(
        "backends = [ { address = \"127.0.0.1:9001\", weight = 3 }, { address = \"127.0.0.1:9002\" } ]",
        "backends = [\n  { address = \"127.0.0.1:9001\" },\n  { address = \"127.0.0.1:9002\", wieght = 3 },\n]",
    );
    let e = error_of(&text);
    assert_eq!((e.line, e.key.as_str()), (Some(20), "pool.backends.wieght"), "{e}");
    let text =
        GOOD.replace("allow_hairpin = true", "balancer_config = { note = \"\"\"\n[frontend]\n\"\"\" }\nmax_flows = 0");
    let e = error_of(&text);
    assert_eq!((e.line, e.key.as_str()), (Some(20), "pool.max_flows"), "{e}");
}

/// R8: every duration, size and count past its bound is refused at its own
/// line and key, and what was accepted cannot overflow the host's arithmetic.
#[test]
fn every_value_is_bounded_and_named_when_out_of_range() {
    let frontend_keys = "tcp_reset = true\nconnect_timeout = \"1s\"\nconnect_retries = 1\nmax_flows = 10";
    let with_probe = format!(
        "{}\n[pool.probe]\nprotocol = \"http\"\npath = \"/health\"\ninterval = \"2s\"\nthreshold = 3\nhost = \"example.com\"\n",
        GOOD.replace("tcp_reset = true", frontend_keys)
    );
    parse(&with_probe).unwrap();
    let huge = "\"300000000000y\"";
    let cases: Vec<(String, &str)> = vec![
        (GOOD.replace("\"30s\"", huge), "frontend.idle_timeout"),
        (
            GOOD.replace(
                "idle_timeout = \"30s\"\ntcp_reset = true",
                "protocol = \"udp\"\nudp_idle_timeout = \"2days\"",
            ),
            "frontend.udp_idle_timeout",
        ),
        (with_probe.replace("\"1s\"", "\"1h\""), "frontend.connect_timeout"),
        (with_probe.replace("connect_retries = 1", "connect_retries = 17"), "frontend.connect_retries"),
        (with_probe.replace("max_flows = 10", "max_flows = 10000001"), "frontend.max_flows"),
        (with_probe.replace("max_flows = 10", "max_flows = 18446744073709551615"), "frontend.max_flows"),
        (GOOD.replace("workers = 2", "workers = 1025"), "runtime.workers"),
        (GOOD.replace("\"5ms\"", "\"11s\""), "runtime.plugin_deadline"),
        (GOOD.replace("\"16MiB\"", "\"5GiB\""), "runtime.plugin_memory"),
        (with_probe.replace("\"2s\"", "\"2h\""), "pool.probe.interval"),
        (with_probe.replace("\"2s\"", &format!("\"2s\"\ntimeout = {huge}")), "pool.probe.timeout"),
        (with_probe.replace("threshold = 3", "threshold = 101"), "pool.probe.threshold"),
        (with_probe.replace("threshold = 3", "threshold = 0"), "pool.probe.threshold"),
        (with_probe.replace("\"/health\"", &format!("\"/{}\"", "a".repeat(3000))), "pool.probe.path"),
        (with_probe.replace("\"example.com\"", "\"a b\""), "pool.probe.host"),
    ];
    for (text, key) in cases {
        let e = error_at_key(&text, key);
        assert!(
            e.message.contains("range")
                || e.message.contains("at most")
                || e.message.contains("at least")
                || e.message.contains("must be")
                || e.message.contains("invalid value"),
            "{e}"
        );
    }
    // Lists: the first item past the bound is named.
    let backends: String =
        (0..=limits::BACKENDS).map(|i| format!("{{ address = \"10.0.{}.{}:80\" }},", i / 250, i % 250)).collect();
    let e = error_of(
        &GOOD.replace("{ address = \"127.0.0.1:9001\", weight = 3 }, { address = \"127.0.0.1:9002\" }", &backends),
    );
    assert_eq!(e.key, "pool.backends.address", "{e}");
    assert!(e.message.contains("more than 10000 backends"), "{e}");
}

#[test]
fn an_oversized_file_is_refused_unread() {
    let dir = std::env::temp_dir().join(format!("fulcrum-config-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.toml");
    let mut text = GOOD.to_owned();
    text.push('#');
    text.push_str(&"x".repeat(limits::CONFIG_BYTES as usize));
    std::fs::write(&path, &text).unwrap();
    let e = Config::load(&path).unwrap_err();
    assert!(e.message.contains("larger than 4 MiB"), "{e}");
    // The same text under the cap reads.
    std::fs::write(&path, GOOD).unwrap();
    Config::load(&path).unwrap();
    // A device that never ends is refused, not read forever.
    let e = Config::load(Path::new("/dev/zero")).unwrap_err();
    assert!(e.message.contains("larger than") || e.message.contains("UTF-8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fuzz target's corpus (`fuzz/corpus/config`, grown by `cargo fuzz run
/// config`), replayed: parse + validate returns, never panics, and every
/// error names a place.
#[test]
fn the_fuzz_corpus_parses_or_fails_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        match Config::parse(Path::new("/nonexistent/fuzz.toml"), text) {
            Ok(config) => assert!(!config.pools.is_empty() || config.frontends.is_empty()),
            Err(e) => assert!(e.to_string().starts_with("/nonexistent/fuzz.toml"), "{e}"),
        }
        replayed += 1;
    }
    assert!(replayed >= 100, "only {replayed} corpus entries in {}", dir.display());
}

#[test]
fn passive_health_and_slow_start_are_read_and_bounded() {
    let config = parse(GOOD).unwrap();
    assert_eq!(config.pools[0].passive, PassiveConfig::default(), "on by default");
    assert_eq!(config.pools[0].slow_start, None);
    let tuned = format!(
        "{GOOD}slow_start = \"30s\"\n[pool.passive]\nfailures = 3\nbackoff = \"1s\"\nmax_backoff = \"1m\"\nmax_ejected_percent = 20\n"
    );
    // `slow_start` sits in the pool table: it must come before `[pool.passive]`.
    let pool = &parse(&tuned).unwrap().pools[0];
    assert_eq!(pool.slow_start, Some(Duration::from_secs(30)));
    assert_eq!(
        pool.passive,
        PassiveConfig {
            enabled: true,
            failures: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_ejected_percent: 20,
        }
    );
    let off = format!("{GOOD}[pool.passive]\nenabled = false\n");
    assert!(!parse(&off).unwrap().pools[0].passive.enabled);
    let cases = [
        (tuned.replace("failures = 3", "failures = 0"), "pool.passive.failures"),
        (tuned.replace("failures = 3", "failures = 1001"), "pool.passive.failures"),
        (tuned.replace("\"1m\"", "\"500ms\""), "pool.passive.max_backoff"),
        (tuned.replace("\"1m\"", "\"2days\""), "pool.passive.max_backoff"),
        (tuned.replace("max_ejected_percent = 20", "max_ejected_percent = 101"), "pool.passive.max_ejected_percent"),
        (tuned.replace("\"30s\"", "\"2h\""), "pool.slow_start"),
        (tuned.replace("failures = 3", "failure = 3"), "pool.passive.failure"),
    ];
    for (text, key) in cases {
        error_at_key(&text, key);
    }
}

/// The error of `text`, checked to name `key` (dotted) on the line where
/// the key's last part starts.
fn error_at_key(text: &str, key: &str) -> ConfigError {
    let e = error_of(text);
    let line = text.lines().position(|l| l.starts_with(key.rsplit('.').next().unwrap_or_default())).map(|i| i + 1);
    assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
    e
}

#[test]
fn flow_log_and_proxy_protocol_are_read_and_checked() {
    let c = parse(GOOD).unwrap();
    let f = &c.frontends[0];
    assert_eq!((&f.flow_log, f.accept_proxy, f.proxy_header_timeout), (&None, false, DEFAULT_PROXY_HEADER_TIMEOUT));
    assert_eq!(c.pools[0].proxy_protocol, None);
    let text = GOOD
        .replace(
            "tcp_reset = true",
            "tcp_reset = true\nflow_log = \"logs/flows.jsonl\"\naccept_proxy = true\nproxy_header_timeout = \"2s\"",
        )
        .replace("allow_hairpin = true", "proxy_protocol = \"v2\"\nallow_hairpin = true");
    let c = Config::parse(Path::new("/etc/fulcrum/fulcrum.toml"), &text).unwrap();
    let f = &c.frontends[0];
    assert_eq!(f.flow_log, Some(FlowLogTarget::File("/etc/fulcrum/logs/flows.jsonl".into())), "relative to the config");
    assert_eq!((f.accept_proxy, f.proxy_header_timeout), (true, Duration::from_secs(2)));
    assert_eq!(c.pools[0].proxy_protocol, Some(ProxyProtocol::V2));
    let stdout = parse(&GOOD.replace("tcp_reset = true", "flow_log = \"stdout\"")).unwrap();
    assert_eq!(stdout.frontends[0].flow_log, Some(FlowLogTarget::Stdout));

    let from =
        parse(&GOOD.replace("tcp_reset = true", "accept_proxy = true\naccept_proxy_from = [\"10.1.2.3/8\", \"::1\"]"))
            .unwrap();
    let nets: Vec<String> = from.frontends[0].accept_proxy_from.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128"]);
    let e = error_at_key(
        &GOOD.replace("tcp_reset = true", "accept_proxy_from = [\"10.0.0.0/8\"]"),
        "frontend.accept_proxy_from",
    );
    assert!(e.message.contains("accept_proxy = true"), "{e}");
    let e = error_of(&GOOD.replace("tcp_reset = true", "accept_proxy = true\naccept_proxy_from = [\"10.0.0.0/33\"]"));
    assert_eq!(e.key, "frontend.accept_proxy_from", "{e}");
    let e = error_at_key(&GOOD.replace("tcp_reset = true", "flow_log = \" \""), "frontend.flow_log");
    assert!(e.message.contains("stdout"), "{e}");
    error_at_key(&GOOD.replace("allow_hairpin = true", "proxy_protocol = \"v3\""), "pool.proxy_protocol");
    let e = error_at_key(
        &GOOD.replace("tcp_reset = true", "proxy_header_timeout = \"2m\""),
        "frontend.proxy_header_timeout",
    );
    assert!(e.message.contains("at most 1m"), "{e}");
    // PROXY headers are TCP's: a UDP frontend may neither accept nor send them.
    let udp = GOOD.replace("idle_timeout = \"30s\"\ntcp_reset = true", "protocol = \"udp\"");
    let e = error_at_key(
        &udp.replace("protocol = \"udp\"", "protocol = \"udp\"\naccept_proxy = true"),
        "frontend.accept_proxy",
    );
    assert!(e.message.contains("TCP"), "{e}");
    let e = error_of(&udp.replace("allow_hairpin = true", "proxy_protocol = \"v1\""));
    assert_eq!(e.key, "frontend.pool", "{e}");
    assert!(e.message.contains("proxy_protocol"), "{e}");
}

#[test]
fn a_backend_that_is_the_frontends_own_address_is_an_error_at_its_line() {
    // The frontend's own address, and a wildcard listener's loopback.
    for (listen, backend) in [("127.0.0.1:8080", "127.0.0.1:8080"), ("0.0.0.0:8080", "127.0.0.1:8080")] {
        let text = GOOD.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"{listen}\"")).replace(
            "{ address = \"127.0.0.1:9002\" }",
            &format!("{{ address = \"127.0.0.1:9002\" }},\n  {{ address = \"{backend}\" }}"),
        );
        let e = parse(&text).unwrap_err().to_string();
        // The line of the backend's address.
        assert!(e.starts_with("test.toml:19: key `pool.backends.address`: pool `web`: backend 127.0.0.1:8080"), "{e}");
        assert!(e.contains("frontend `web` listens"), "{e}");
    }
    // Another port, or a UDP frontend's address as a TCP pool's backend: fine.
    let other_port = GOOD.replace("127.0.0.1:9002\" }", "127.0.0.1:8081\" }");
    assert!(parse(&other_port).is_ok());
    let udp = GOOD.to_owned()
        + "\n[[frontend]]\nname = \"dns\"\nlisten = \"127.0.0.1:9001\"\nprotocol = \"udp\"\npool = \"dns\"\n\n\
           [[pool]]\nname = \"dns\"\nbackends = [ { address = \"127.0.0.1:5353\" } ]\n";
    parse(&udp).unwrap();
}

/// B15: one hairpin switch, the pool's; a stock balancer is handed it, and
/// its own copy of the key is an error at the balancer's line.
#[test]
fn hairpin_is_the_pools_switch_and_stock_balancers_are_handed_it() {
    let c = parse(GOOD).unwrap();
    assert!(c.pool("web").unwrap().allow_hairpin);
    assert_eq!(c.pool("web").unwrap().balancer_config, r#"{"allow_hairpin":true}"#, "handed to the stock balancer");
    let off = parse(&GOOD.replace("allow_hairpin = true\n", "")).unwrap();
    assert_eq!(off.pool("web").unwrap().balancer_config, "{}");
    let e = error_of(&GOOD.replace("allow_hairpin = true", "balancer_config = { allow_hairpin = true }"));
    assert_eq!((e.line, e.key.as_str()), (Some(16), "pool.balancer_config.allow_hairpin"), "{e}");
    assert!(e.message.contains("the pool's switch"), "{e}");
}

/// Keys that mean nothing for a frontend's protocol are errors at their line.
#[test]
fn a_key_of_the_other_protocol_is_an_error_at_its_line() {
    for (key, value) in [
        ("tcp_reset", "true"),
        ("connect_timeout", "\"1s\""),
        ("connect_retries", "1"),
        ("proxy_header_timeout", "\"1s\""),
        ("idle_timeout", "\"1s\""),
    ] {
        let text =
            GOOD.replace("idle_timeout = \"30s\"\ntcp_reset = true", &format!("protocol = \"udp\"\n{key} = {value}"));
        let e = error_of(&text);
        assert_eq!((e.line, e.key.clone()), (Some(12), format!("frontend.{key}")), "{e}");
        assert!(e.message.contains("for TCP frontends only"), "{e}");
    }
    let e = error_of(&GOOD.replace("tcp_reset = true", "udp_idle_timeout = \"1s\""));
    assert_eq!((e.line, e.key.as_str()), (Some(12), "frontend.udp_idle_timeout"), "{e}");
}

/// The keys the parser takes in one table, as its own error for an unknown
/// key lists them ("expected one of `a`, `b`").
fn keys_of(text: &str) -> Vec<String> {
    let e = error_of(text);
    let expected = e.message.split_once("expected").map(|(_, list)| list).unwrap_or_else(|| panic!("{e}"));
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// docs/config.md lists every key of every table, under that table's heading.
#[test]
fn every_config_key_is_in_the_reference() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md")).unwrap();
    let base = "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\nFRONTEND\n\n\
                [[pool]]\nname = \"web\"\nPOOL\nbackends = [ { address = \"127.0.0.1:9001\"BACKEND } ]\nTABLES\n";
    let put = |at: &str, what: &str| {
        let text = base.replace(at, what);
        ["FRONTEND", "POOL", "BACKEND", "TABLES"].iter().fold(text, |t, mark| t.replace(mark, ""))
    };
    let tables = [
        ("## `[runtime]`", format!("[runtime]\nzzz_unknown = 1\n{}", put("", ""))),
        ("## `[admin]`", format!("[admin]\nzzz_unknown = 1\n{}", put("", ""))),
        ("## `[[frontend]]`", put("FRONTEND", "zzz_unknown = 1")),
        ("## `[[pool]]`", put("POOL", "zzz_unknown = 1")),
        ("## `backends = [ ... ]` entries", put("BACKEND", ", zzz_unknown = 1")),
        ("## `[pool.probe]` and `[[pool.signal]]`", put("TABLES", "[pool.probe]\nprotocol = \"tcp\"\nzzz_unknown = 1")),
        ("## `[pool.passive]`", put("TABLES", "[pool.passive]\nzzz_unknown = 1")),
    ];
    let mut checked = 0;
    for (heading, text) in tables {
        let start = doc.find(heading).unwrap_or_else(|| panic!("docs/config.md has no section {heading}"));
        let section = &doc[start + heading.len()..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        let keys = keys_of(&text);
        assert!(keys.len() >= 2, "{heading}: no keys read from the parser's error");
        for key in keys {
            assert!(section.contains(&format!("| `{key}` |")), "docs/config.md, {heading}: key `{key}` is not listed");
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} keys checked");
}
