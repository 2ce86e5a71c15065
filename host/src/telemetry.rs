//! # Telemetry: the metrics registry
//!
//! Prometheus text (served as the admin API's `/metrics`), rendered by
//! `metrics-exporter-prometheus` from a recorder of this server's own (several servers can share a
//! process). The data path keeps plain atomics; at each scrape their values
//! are set on the recorder (`absolute` counters, gauges), so counting costs
//! the data path nothing more. Probe results and latencies are recorded as
//! they come (control thread).
//!
//! Names follow Prometheus conventions: `fulcrum_` prefix, base units
//! (seconds, bytes), `_total` counters.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::flow::CloseReason;
use crate::live::{ReloadLog, State};
use crate::plugin::{Fault, PluginInfo};
use crate::probe::Report;

/// Panics anywhere in the process (counted by the binary's panic hook).
pub static PANICS: AtomicU64 = AtomicU64::new(0);

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Pauses of the admin API's accept loop, out of descriptors (R1).
    pub admin_accept_pauses: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        Metrics { recorder, handle, admin_accept_pauses: AtomicU64::new(0) }
    }

    /// Counts one probe result and its latency.
    pub fn probe_result(&self, report: &Report) {
        let source = report.source.to_string();
        let outcome = report.observation.outcome.as_str();
        let (pool, backend) = (report.pool.to_string(), report.backend.to_string());
        metrics::with_local_recorder(&self.recorder, || {
            counter!("fulcrum_probe_results_total", "pool" => pool.clone(), "backend" => backend, "source" => source.clone(), "outcome" => outcome)
                .increment(1);
            histogram!("fulcrum_probe_duration_seconds", "pool" => pool, "source" => source)
                .record(report.observation.latency_us as f64 / 1e6);
        });
    }

    /// Sets every counter and gauge from the live atomics, then renders.
    pub fn render(&self, state: &State, reloads: &ReloadLog) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            counter!("fulcrum_admin_accept_pauses_total").absolute(self.admin_accept_pauses.load(Ordering::Relaxed));
            gauge!("fulcrum_udp_sockets_open").set(crate::net::udp_sockets_open() as f64);
            gauge!("fulcrum_udp_sockets_limit").set(crate::net::udp_socket_cap() as f64);
            counter!("fulcrum_panics_total").absolute(PANICS.load(Ordering::Relaxed));
            for f in &state.frontends {
                let name = f.name.clone();
                gauge!("fulcrum_active_flows", "frontend" => name.clone()).set(f.flows.active() as f64);
                counter!("fulcrum_flows_started_total", "frontend" => name.clone()).absolute(f.flows.started());
                for reason in CloseReason::ALL {
                    counter!("fulcrum_flows_ended_total", "frontend" => name.clone(), "reason" => reason.as_str())
                        .absolute(f.flows.closed(reason));
                }
                counter!("fulcrum_datagrams_dropped_total", "frontend" => name.clone()).absolute(f.flows.dropped());
                counter!("fulcrum_accept_pauses_total", "frontend" => name.clone()).absolute(f.flows.accept_pauses());
                counter!("fulcrum_proxy_headers_refused_total", "frontend" => name.clone())
                    .absolute(f.flows.proxy_headers_refused());
                counter!("fulcrum_proxy_header_slots_full_total", "frontend" => name.clone())
                    .absolute(f.flows.proxy_header_slots_full());
                if let Some(log) = &f.binding.load().recorder.log {
                    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
                    counter!("fulcrum_flow_log_lines_total", "frontend" => name.clone(), "outcome" => "written")
                        .absolute(n(&log.counters.written));
                    counter!("fulcrum_flow_log_lines_total", "frontend" => name.clone(), "outcome" => "dropped")
                        .absolute(n(&log.counters.dropped));
                }
                let (up, down) = f.flows.bytes();
                counter!("fulcrum_bytes_total", "frontend" => name.clone(), "direction" => "client_to_backend")
                    .absolute(up);
                counter!("fulcrum_bytes_total", "frontend" => name, "direction" => "backend_to_client").absolute(down);
            }
            for p in &state.pools {
                let pool = p.config.name.clone();
                counter!("fulcrum_source_ports_exhausted_total", "pool" => pool.clone())
                    .absolute(p.pool.source_ports_exhausted.load(Ordering::Relaxed));
                for b in p.pool.load().backends.iter() {
                    let labels = [("pool", pool.clone()), ("backend", b.addr.to_string())];
                    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
                    gauge!("fulcrum_backend_up", &labels)
                        .set(f64::from(u8::from(b.state != fulcrum_sdk::BackendState::Down)));
                    gauge!("fulcrum_backend_draining", &labels)
                        .set(f64::from(u8::from(b.state == fulcrum_sdk::BackendState::Draining)));
                    gauge!("fulcrum_backend_weight", &labels).set(f64::from(b.weight));
                    gauge!("fulcrum_backend_active_flows", &labels)
                        .set(f64::from(b.stats.active_flows.load(Ordering::Relaxed)));
                    counter!("fulcrum_backend_flows_total", &labels).absolute(n(&b.stats.flows_total));
                    counter!("fulcrum_backend_connect_failures_total", &labels).absolute(n(&b.stats.connect_failures));
                    counter!("fulcrum_backend_connect_retries_total", &labels).absolute(n(&b.stats.connect_retries));
                }
                plugin(&pool, "balancer", &p.balancer.info);
                if let Some(h) = &p.probe {
                    plugin(&pool, "probe_health", &h.info);
                }
                for h in &p.signals {
                    plugin(&pool, "signal_health", &h.info);
                }
            }
            counter!("fulcrum_reloads_total", "outcome" => "ok").absolute(reloads.ok.load(Ordering::Relaxed));
            counter!("fulcrum_reloads_total", "outcome" => "failed").absolute(reloads.failed.load(Ordering::Relaxed));
        });
        let mut text = self.handle.render();
        // The data path's histograms, kept in its own atomics (one add per
        // sample, no recorder lookup), in the same exposition format.
        let pools: Vec<_> = state.pools.iter().map(|p| (p.config.name.as_str(), &p.pool)).collect();
        histogram_text(
            &mut text,
            "fulcrum_backend_connect_seconds",
            "Time to connect to a backend's data port (TCP), per pool.",
            pools.iter().map(|(name, pool)| (*name, pool.connect_seconds.snapshot())),
        );
        histogram_text(
            &mut text,
            "fulcrum_flow_duration_seconds",
            "Durations of the flows that ended, per pool.",
            pools.iter().map(|(name, pool)| (*name, pool.flow_seconds.snapshot())),
        );
        text
    }
}

/// Appends one histogram family (`pool` label) in the Prometheus text format.
fn histogram_text<'a>(
    text: &mut String,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (&'a str, crate::pool::HistogramSnapshot)>,
) {
    use std::fmt::Write;
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (pool, h) in series {
        let pool = pool.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        for (bound, count) in &h.buckets {
            let _ = writeln!(text, "{name}_bucket{{pool=\"{pool}\",le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(text, "{name}_bucket{{pool=\"{pool}\",le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(text, "{name}_sum{{pool=\"{pool}\"}} {}", h.sum_seconds);
        let _ = writeln!(text, "{name}_count{{pool=\"{pool}\"}} {}", h.count);
    }
}

fn plugin(pool: &str, role: &'static str, info: &PluginInfo) {
    let s = &info.stats;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let labels = [("pool", pool.to_owned()), ("role", role.to_owned()), ("plugin", info.name.clone())];
    counter!("fulcrum_plugin_calls_total", &labels).absolute(s.calls());
    counter!("fulcrum_plugin_fallbacks_total", &labels).absolute(n(&s.fallbacks));
    counter!("fulcrum_plugin_instantiations_total", &labels).absolute(n(&s.instantiations));
    for fault in Fault::ALL {
        let mut with_kind = labels.to_vec();
        with_kind.push(("kind", fault.as_str().to_owned()));
        counter!("fulcrum_plugin_faults_total", &with_kind).absolute(s.faults_of(fault));
    }
    gauge!("fulcrum_plugin_benched", &labels).set(f64::from(u8::from(info.benched())));
    counter!("fulcrum_plugin_log_dropped_lines_total", &labels).absolute(n(&s.logs_dropped));
    counter!("fulcrum_plugin_log_dropped_bytes_total", &labels).absolute(n(&s.log_bytes_dropped));
    counter!("fulcrum_plugin_calls_sampled_total", &labels).absolute(n(&s.sampled_calls));
    gauge!("fulcrum_plugin_call_seconds_mean", &labels).set(s.sampled_mean_seconds());
}

fn describe() {
    describe_gauge!("fulcrum_active_flows", Unit::Count, "Established flows of a frontend.");
    describe_counter!("fulcrum_flows_started_total", Unit::Count, "Flows admitted by a frontend.");
    describe_counter!("fulcrum_flows_ended_total", Unit::Count, "Flows ended (or refused), by close reason.");
    describe_counter!("fulcrum_bytes_total", Unit::Bytes, "Bytes forwarded, by direction.");
    describe_counter!(
        "fulcrum_datagrams_dropped_total",
        Unit::Count,
        "UDP datagrams dropped (no backend, flow cap, full buffer)."
    );
    describe_counter!(
        "fulcrum_accept_pauses_total",
        Unit::Count,
        "Times an accept loop paused because the process was out of descriptors."
    );
    describe_counter!(
        "fulcrum_admin_accept_pauses_total",
        Unit::Count,
        "Times the admin API's accept loop paused because the process was out of descriptors."
    );
    describe_gauge!("fulcrum_udp_sockets_open", Unit::Count, "Backend-facing UDP sockets open (one per UDP flow).");
    describe_gauge!("fulcrum_udp_sockets_limit", Unit::Count, "Cap on backend-facing UDP sockets (R6).");
    describe_counter!("fulcrum_panics_total", Unit::Count, "Panics in the process (bugs): each is logged.");
    describe_counter!(
        "fulcrum_source_ports_exhausted_total",
        Unit::Count,
        "Backend connects that found no free source port on this host (B16)."
    );
    describe_gauge!("fulcrum_backend_up", "1 unless the backend is down.");
    describe_gauge!("fulcrum_backend_draining", "1 while the backend is draining.");
    describe_gauge!("fulcrum_backend_weight", "Effective weight, 0..=100.");
    describe_gauge!("fulcrum_backend_active_flows", Unit::Count, "Established flows on a backend.");
    describe_counter!("fulcrum_backend_flows_total", Unit::Count, "Flows sent to a backend.");
    describe_counter!(
        "fulcrum_backend_connect_failures_total",
        Unit::Count,
        "Failed connects to a backend's data port."
    );
    describe_counter!(
        "fulcrum_backend_connect_retries_total",
        Unit::Count,
        "Flows retried elsewhere after a failed connect."
    );
    describe_counter!("fulcrum_probe_results_total", Unit::Count, "Probe results, by outcome.");
    describe_histogram!("fulcrum_probe_duration_seconds", Unit::Seconds, "Probe latency.");
    describe_counter!("fulcrum_plugin_calls_total", Unit::Count, "Plugin calls.");
    describe_counter!("fulcrum_plugin_faults_total", Unit::Count, "Plugin faults, by kind.");
    describe_counter!("fulcrum_plugin_fallbacks_total", Unit::Count, "Calls answered by the built-in fallback.");
    describe_counter!("fulcrum_plugin_instantiations_total", Unit::Count, "Plugin instances made.");
    describe_gauge!("fulcrum_plugin_benched", "1 while the plugin is benched for faulting too often.");
    describe_counter!(
        "fulcrum_plugin_log_dropped_lines_total",
        Unit::Count,
        "Plugin log lines (log import, stdout, stderr) not shown: over the rate limit."
    );
    describe_counter!(
        "fulcrum_plugin_log_dropped_bytes_total",
        Unit::Bytes,
        "Plugin log bytes not shown: dropped lines and the cut tails of long lines."
    );
    describe_counter!("fulcrum_plugin_calls_sampled_total", Unit::Count, "Plugin calls timed (1 in 64).");
    describe_gauge!("fulcrum_plugin_call_seconds_mean", Unit::Seconds, "Mean duration of the timed plugin calls.");
    describe_counter!("fulcrum_reloads_total", Unit::Count, "Config reloads, by outcome.");
    describe_counter!(
        "fulcrum_proxy_headers_refused_total",
        Unit::Count,
        "Connections refused for their PROXY header (accept_proxy): malformed, too slow or too big."
    );
    describe_counter!(
        "fulcrum_proxy_header_slots_full_total",
        Unit::Count,
        "Connections refused because every PROXY header slot (or the peer's share of them) was taken."
    );
    describe_counter!(
        "fulcrum_flow_log_lines_total",
        Unit::Count,
        "Flow log lines: written, or dropped (the writer behind, a write failed)."
    );
}
