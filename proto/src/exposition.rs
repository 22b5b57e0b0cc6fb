//! Prometheus' text exposition format (version 0.0.4), which the controller's and the proxies'
//! `/metrics` both write: families with their `HELP` and `TYPE`, then samples with labels.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (and back to zero on a restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

/// A page of metrics being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Exposition {
        Exposition {
            text: String::with_capacity(4096),
        }
    }

    /// Starts the family `name`: its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        // HELP text escapes only backslashes and line feeds.
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample: `name{labels} value`. Label values are escaped here.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// `kanali_log_count`: the process's log events by level, as [`CountLogs`] counted them.
    pub fn log_counts(&mut self) -> &mut Self {
        self.family(
            "kanali_log_count",
            Kind::Counter,
            "Log events emitted, by level.",
        );
        for (level, count) in LOG_LEVELS.iter().zip(&LOG_COUNTS) {
            self.sample(
                "kanali_log_count",
                &[("level", level)],
                count.load(Ordering::Relaxed),
            );
        }
        self
    }

    /// The standard process families every Prometheus target has, from `/proc/self` (left
    /// out where the system has no such file).
    pub fn process(&mut self) -> &mut Self {
        if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| cpu_ticks(&stat))
        {
            // In USER_HZ, which is 100 on every architecture Linux runs containers on (and
            // what Prometheus' own process collector assumes).
            self.single(
                "process_cpu_seconds_total",
                Kind::Counter,
                "User and system CPU time spent, in seconds.",
                ticks as f64 / 100.0,
            );
        }
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            });
        if let Some(kib) = rss_kib {
            self.single(
                "process_resident_memory_bytes",
                Kind::Gauge,
                "Resident memory size in bytes.",
                kib.saturating_mul(1024),
            );
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.single(
                "process_open_fds",
                Kind::Gauge,
                "Open file descriptors.",
                fds.count(),
            );
        }
        self
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

/// The levels of [`LOG_COUNTS`], as `kanali_log_count` labels them.
const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Log events by level, for the process (the log is the process's, as is its subscriber).
static LOG_COUNTS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// A `tracing` layer that counts the events that pass the log's filter, by level, for
/// `kanali_log_count` ([`Exposition::log_counts`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CountLogs;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountLogs {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let i = match *event.metadata().level() {
            tracing::Level::TRACE => 0,
            tracing::Level::DEBUG => 1,
            tracing::Level::INFO => 2,
            tracing::Level::WARN => 3,
            tracing::Level::ERROR => 4,
        };
        LOG_COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// utime + stime from `/proc/self/stat`: the 14th and 15th fields, counted after the command
/// name, which is in parentheses and may hold spaces and parentheses itself.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after) = stat.rsplit_once(')')?;
    let mut fields = after.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A label value escaped for the text format: backslash, double quote and line feed.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1 0 0 0 170 30 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some(200));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
        // This process's own, which the kernel writes.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks(&own).is_some(), "{own}");
    }

    #[test]
    fn the_process_families_are_there_on_linux() {
        let mut page = Exposition::new();
        page.process();
        let text = page.finish();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name}in\n{text}"
            );
        }
    }

    #[test]
    fn families_and_samples_are_written_as_prometheus_reads_them() {
        let mut page = Exposition::new();
        page.family("a_total", Kind::Counter, "As, counted.\nTwo lines.")
            .sample("a_total", &[("code", "00"), ("v", "x\"y\\z\nw")], 3)
            .sample("a_total", &[], 0.5);
        page.single("b", Kind::Gauge, "B.", -1);
        assert_eq!(
            page.finish(),
            "# HELP a_total As, counted.\\nTwo lines.\n# TYPE a_total counter\n\
             a_total{code=\"00\",v=\"x\\\"y\\\\z\\nw\"} 3\n\
             a_total 0.5\n\
             # HELP b B.\n# TYPE b gauge\n\
             b -1\n"
        );
    }

    #[test]
    fn logs_are_counted_by_level_after_the_filter() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let logs = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::io::sink)
            .finish()
            .with(CountLogs);
        let count = |i: usize| LOG_COUNTS[i].load(Ordering::Relaxed);
        let (info, warn, error) = (count(2), count(3), count(4));
        // This thread's subscriber only: other tests' events are not counted meanwhile.
        tracing::subscriber::with_default(logs, || {
            tracing::info!("filtered out");
            tracing::warn!("one");
            tracing::error!("two");
            tracing::error!("three");
        });
        assert_eq!((count(2), count(3), count(4)), (info, warn + 1, error + 2));
    }
}
