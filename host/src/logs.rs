//! Plugin logs: a bounded ring of recent lines per plugin, live followers, and the caps that
//! keep a plugin that logs without end from flooding memory or the server's own log. Nodes
//! sharing a backend announce their lines to each other, so every node's ring holds the
//! lines of all of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::storage::Storage;

/// Lines kept per plugin.
pub const RING_LINES: usize = 1000;
/// Lines one call may log; later lines of the call are dropped (and counted).
pub const LINES_PER_CALL: u32 = 100;
/// Lines per plugin per second that also go to the server's log (all go to the ring).
const TRACED_PER_SECOND: u32 = 50;
/// Followers that fall this far behind skip ahead (they are told how many lines they missed).
const FOLLOW_BUFFER: usize = 1024;
/// Lines waiting to be announced to other nodes; more are not announced (best effort).
const ANNOUNCE_BUFFER: usize = 4096;
/// The channel nodes announce log lines on.
const CHANNEL: &str = "plugin-logs";

/// Lines announced in one message at most, and the bytes past which no more are added (one
/// line more at most: far below NATS's 1 MiB default payload): one announcement per line was
/// a NATS message per delivery of a plugin that logs each message.
const ANNOUNCE_LINES: usize = 256;
const ANNOUNCE_BYTES: usize = 64 * 1024;

/// `first` and the lines already waiting after it (up to [`ANNOUNCE_LINES`] and about
/// [`ANNOUNCE_BYTES`]), as one announcement: JSON lines, one per line (serde_json escapes
/// newlines inside strings). A node from before batching parses an announcement as one line,
/// so during a rolling upgrade it drops those of several lines (announcing is best effort).
fn announce_batch(first: Vec<u8>, waiting: &mut mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    let mut batch = first;
    for _ in 1..ANNOUNCE_LINES {
        if batch.len() >= ANNOUNCE_BYTES {
            break;
        }
        let Ok(line) = waiting.try_recv() else { break };
        batch.push(b'\n');
        batch.extend_from_slice(&line);
    }
    batch
}

/// Plugin log levels: what `level` of a line can be.
const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// A level read back (a line another node announced) as one of [`LEVELS`].
fn known_level<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::borrow::Cow<'static, str>, D::Error> {
    let level = String::deserialize(d)?;
    Ok(LEVELS
        .into_iter()
        .find(|l| *l == level)
        .unwrap_or("info")
        .into())
}

/// A kept line; also what nodes announce to each other (the receiver gives it its own `seq`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LogLine {
    /// Position in this plugin's log since the server started; `since` takes it.
    pub seq: u64,
    /// The node whose plugin instance logged it (when several nodes share a backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// One of [`LEVELS`].
    #[serde(deserialize_with = "known_level")]
    pub level: std::borrow::Cow<'static, str>,
    pub plugin: String,
    pub version: u32,
    pub group: String,
    pub instance: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub message: String,
}

/// What one call logs; `seq` and `at` are filled in by [`PluginLogs::push`].
#[derive(Debug)]
pub struct NewLine<'a> {
    pub level: &'static str,
    pub plugin: &'a str,
    pub version: u32,
    pub group: &'a str,
    pub instance: u32,
    pub message_id: Option<&'a str>,
    pub message: String,
}

struct Ring {
    lines: VecDeque<Arc<LogLine>>,
    next_seq: u64,
    /// Lines not kept because a call passed [`LINES_PER_CALL`].
    dropped: u64,
    live: broadcast::Sender<Arc<LogLine>>,
    trace_second: u64,
    traced_in_second: u32,
}

impl Ring {
    fn new() -> Self {
        Self {
            lines: VecDeque::new(),
            next_seq: 0,
            dropped: 0,
            live: broadcast::channel(FOLLOW_BUFFER).0,
            trace_second: 0,
            traced_in_second: 0,
        }
    }
}

/// A page of a plugin's log.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LogPage {
    pub lines: Vec<Arc<LogLine>>,
    /// Lines dropped by the per-call cap since the server started.
    pub dropped: u64,
    /// `since` for the next page.
    pub next: u64,
}

/// This node's name and where its lines go to be announced.
struct Sharing {
    node: String,
    out: mpsc::Sender<Vec<u8>>,
}

#[derive(Default)]
pub struct PluginLogs {
    rings: Mutex<HashMap<String, Ring>>,
    sharing: std::sync::OnceLock<Sharing>,
}

impl std::fmt::Debug for PluginLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLogs").finish_non_exhaustive()
    }
}

impl PluginLogs {
    /// Announces this node's lines to the other nodes sharing `storage` (as `node`), and keeps
    /// theirs, until `stop`.
    pub fn share(
        self: &Arc<Self>,
        node: String,
        storage: Arc<dyn Storage>,
        stop: CancellationToken,
    ) {
        let (out, mut rx) = mpsc::channel::<Vec<u8>>(ANNOUNCE_BUFFER);
        if self
            .sharing
            .set(Sharing {
                node: node.clone(),
                out,
            })
            .is_err()
        {
            return;
        }
        let (sender, token) = (storage.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    line = rx.recv() => match line {
                        Some(line) => {
                            let batch = announce_batch(line, &mut rx);
                            sender.announce(CHANNEL, batch).await;
                        }
                        None => return,
                    },
                }
            }
        });
        let logs = self.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            let Some(mut lines) = storage.listen(CHANNEL).await else {
                return;
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    line = lines.next() => match line {
                        Some(bytes) => logs.keep_announced(&node, &bytes),
                        None => return,
                    },
                }
            }
        });
    }

    /// Keeps the lines another node announced, one JSON line each (this node's own come back
    /// too: skipped).
    fn keep_announced(&self, this_node: &str, bytes: &[u8]) {
        for one in bytes.split(|b| *b == b'\n') {
            let Ok(line) = serde_json::from_slice::<LogLine>(one) else {
                continue;
            };
            if line.node.as_deref().is_none_or(|n| n == this_node) {
                continue;
            }
            // Their own server logged it already (within its cap).
            self.keep(line, false);
        }
    }

    /// Keeps a line of this node; returns whether it should also go to the server's log (a
    /// per-second cap).
    pub fn push(&self, line: NewLine<'_>) -> bool {
        let sharing = self.sharing.get();
        let line = LogLine {
            seq: 0,
            node: sharing.map(|s| s.node.clone()),
            at: crate::base::now_ms(),
            level: line.level.into(),
            plugin: line.plugin.to_string(),
            version: line.version,
            group: line.group.to_string(),
            instance: line.instance,
            message_id: line.message_id.map(str::to_string),
            message: line.message,
        };
        if let Some(s) = sharing
            && let Ok(bytes) = serde_json::to_vec(&line)
        {
            // Full: the line stays on this node only.
            let _ = s.out.try_send(bytes);
        }
        self.keep(line, true)
    }

    /// Puts a line in its plugin's ring under the next seq and hands it to followers; returns
    /// whether it is within the per-second tracing cap (counted for `traced` lines only).
    fn keep(&self, mut line: LogLine, traced: bool) -> bool {
        let Ok(mut rings) = self.rings.lock() else {
            return false;
        };
        let at = line.at;
        let ring = rings.entry(line.plugin.clone()).or_insert_with(Ring::new);
        line.seq = ring.next_seq;
        let kept = Arc::new(line);
        ring.next_seq += 1;
        if ring.lines.len() == RING_LINES {
            ring.lines.pop_front();
        }
        ring.lines.push_back(kept.clone());
        // No follower is not an error.
        let _ = ring.live.send(kept);
        if !traced {
            return false;
        }
        let second = at / 1000;
        if ring.trace_second != second {
            ring.trace_second = second;
            ring.traced_in_second = 0;
        }
        ring.traced_in_second += 1;
        ring.traced_in_second <= TRACED_PER_SECOND
    }

    /// Counts lines a call could not log.
    pub fn dropped(&self, plugin: &str, n: u64) {
        if let Ok(mut rings) = self.rings.lock() {
            rings
                .entry(plugin.to_string())
                .or_insert_with(Ring::new)
                .dropped += n;
        }
    }

    /// Up to `limit` lines from `since` on (the newest ones when `since` is none).
    pub fn page(&self, plugin: &str, since: Option<u64>, limit: usize) -> LogPage {
        let Ok(rings) = self.rings.lock() else {
            return LogPage {
                lines: Vec::new(),
                dropped: 0,
                next: 0,
            };
        };
        let Some(ring) = rings.get(plugin) else {
            return LogPage {
                lines: Vec::new(),
                dropped: 0,
                next: 0,
            };
        };
        let lines: Vec<_> = match since {
            Some(s) => ring
                .lines
                .iter()
                .filter(|l| l.seq >= s)
                .take(limit)
                .cloned()
                .collect(),
            None => {
                let skip = ring.lines.len().saturating_sub(limit);
                ring.lines.iter().skip(skip).cloned().collect()
            }
        };
        let next = lines
            .last()
            .map_or(since.unwrap_or(ring.next_seq), |l| l.seq + 1);
        LogPage {
            lines,
            dropped: ring.dropped,
            next,
        }
    }

    /// Live lines of `plugin` from now on.
    pub fn follow(&self, plugin: &str) -> Option<broadcast::Receiver<Arc<LogLine>>> {
        let mut rings = self.rings.lock().ok()?;
        Some(
            rings
                .entry(plugin.to_string())
                .or_insert_with(Ring::new)
                .live
                .subscribe(),
        )
    }

    /// Forgets a deleted plugin's log.
    pub fn remove(&self, plugin: &str) {
        if let Ok(mut rings) = self.rings.lock() {
            rings.remove(plugin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize) -> NewLine<'static> {
        NewLine {
            level: "info",
            plugin: "p",
            version: 1,
            group: "g",
            instance: 0,
            message_id: None,
            message: format!("line {i}"),
        }
    }

    /// Lines waiting to be announced go out together, as many as fit in one announcement,
    /// and the other node keeps each of them in order, newlines inside a line included.
    #[tokio::test]
    async fn waiting_lines_are_announced_together_and_kept_one_by_one() {
        let (tx, mut rx) = mpsc::channel(ANNOUNCE_BUFFER);
        let encode = |i: usize| {
            let mut l = line(i);
            l.message = format!("line {i}\nsecond row");
            serde_json::to_vec(&LogLine {
                seq: 0,
                node: Some("a".into()),
                at: 1,
                level: l.level.into(),
                plugin: l.plugin.into(),
                version: 1,
                group: l.group.into(),
                instance: 0,
                message_id: None,
                message: l.message,
            })
            .unwrap()
        };
        for i in 0..ANNOUNCE_LINES + 10 {
            tx.try_send(encode(i)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let batch = announce_batch(first, &mut rx);
        let rest = announce_batch(rx.try_recv().unwrap(), &mut rx);
        assert!(rx.try_recv().is_err(), "two announcements carry them all");
        let other = PluginLogs::default();
        other.keep_announced("b", &batch);
        other.keep_announced("b", &rest);
        let kept = other.page("p", Some(0), 1000).lines;
        assert_eq!(kept.len(), ANNOUNCE_LINES + 10);
        for (i, l) in kept.iter().enumerate() {
            assert_eq!(l.message, format!("line {i}\nsecond row"));
        }
        // Its own lines, coming back, are skipped.
        let own = PluginLogs::default();
        own.keep_announced("a", &batch);
        assert!(own.page("p", Some(0), 10).lines.is_empty());
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_and_pages_from_a_seq() {
        let logs = PluginLogs::default();
        let mut traced = 0;
        for i in 0..RING_LINES + 10 {
            traced += usize::from(logs.push(line(i)));
        }
        assert!(traced <= 2 * TRACED_PER_SECOND as usize, "{traced}");
        let newest = logs.page("p", None, 5);
        assert_eq!(newest.lines.len(), 5);
        assert_eq!(newest.lines[4].message, format!("line {}", RING_LINES + 9));
        assert_eq!(newest.next, (RING_LINES + 10) as u64);
        // Lines before the ring's start are gone: paging starts at the oldest kept.
        let first = logs.page("p", Some(0), 3);
        assert_eq!(first.lines[0].seq, 10);
        assert_eq!(first.next, 13);
        let none = logs.page("p", Some(newest.next), 10);
        assert!(none.lines.is_empty());
        assert_eq!(none.next, newest.next);
        logs.dropped("p", 7);
        assert_eq!(logs.page("p", None, 1).dropped, 7);
        assert!(logs.page("other", None, 1).lines.is_empty());
    }

    #[test]
    fn lines_announced_by_other_nodes_are_kept_with_their_node_and_own_ones_skipped() {
        let logs = PluginLogs::default();
        let announced = |node: &str, message: &str| {
            serde_json::to_vec(&LogLine {
                seq: 7,
                node: Some(node.into()),
                at: 1,
                level: "warn".into(),
                plugin: "p".into(),
                version: 2,
                group: "g".into(),
                instance: 1,
                message_id: None,
                message: message.into(),
            })
            .unwrap()
        };
        logs.keep_announced("me", &announced("other", "theirs"));
        logs.keep_announced("me", &announced("me", "mine, back from the bus"));
        logs.keep_announced("me", b"not json");
        let page = logs.page("p", None, 10);
        assert_eq!(page.lines.len(), 1);
        let l = &page.lines[0];
        assert_eq!(
            (
                l.node.as_deref(),
                l.level.as_ref(),
                l.message.as_str(),
                l.seq
            ),
            (Some("other"), "warn", "theirs", 0)
        );
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let logs = PluginLogs::default();
        let mut rx = logs.follow("p").unwrap();
        logs.push(line(1));
        assert_eq!(rx.recv().await.unwrap().message, "line 1");
    }
}
