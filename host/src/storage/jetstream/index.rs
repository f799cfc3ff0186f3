//! The id and business-key index on JetStream, one index stream per queue (`WQX_{topic}_{queue}`)
//! beside the queue's own stream: the index goes with its queue, by the same age limit and by
//! a purge after each deletion (size, consumption, the topic's deletion), with no request per
//! entry. A message id carries its topic's tag and queue ([`crate::storage::message_id_for`]),
//! so a lookup by id asks the index streams of that queue number only.
//!
//! Ids made otherwise (and every entry written before this layout) are in the global id
//! bucket (`KV_WQ_IDS`) and key stream (`WQ_KEYS`), which lookups read second.

use std::collections::VecDeque;

use super::*;

/// How many (index sequence, queue high water) pairs a queue keeps for
/// [`JetStreamStorage::purge_index`].
const CHECKPOINTS: usize = 64;

pub(super) fn index_stream_name(topic: &str, queue: u32) -> String {
    format!("WQX_{}_{queue}", enc(topic))
}

fn id_subject(topic: &str, queue: u32, id: &MessageId) -> String {
    format!("wqx.{}.{queue}.i.{id}", enc(topic))
}

fn key_subject(topic: &str, queue: u32, key: &str) -> String {
    format!("wqx.{}.{queue}.k.{}", enc(topic), enc(key))
}

/// Pairs of (index stream's last sequence, queue's high water) read in that order, oldest
/// first: every entry up to the sequence points below the high water (an entry is written
/// after its message is acknowledged).
pub(super) type Checkpoints = std::sync::Mutex<HashMap<(String, u32), VecDeque<(u64, u64)>>>;

impl JetStreamStorage {
    /// The configuration of a queue's index stream: the queue's age limit, no size limit (a
    /// purge follows the queue's), direct gets for lookups.
    pub(super) fn index_config(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
    ) -> stream::Config {
        stream::Config {
            name: index_stream_name(topic, queue),
            subjects: vec![format!("wqx.{}.{queue}.>", enc(topic))],
            num_replicas: self.replicas,
            allow_direct: true,
            max_age: Duration::from_millis(limits.max_age_ms.unwrap_or(0)),
            max_bytes: -1,
            duplicate_window: duplicate_window(limits.max_age_ms),
            ..Default::default()
        }
    }

    /// A queue's index stream; created when `create`, else `None` if it never existed.
    pub(super) async fn index_stream(
        &self,
        topic: &str,
        queue: u32,
        create: bool,
    ) -> Result<Option<Stream>, StorageError> {
        if let Some(s) = self
            .index_streams
            .lock()
            .await
            .get(&(topic.to_string(), queue))
        {
            return Ok(Some(s.clone()));
        }
        let name = index_stream_name(topic, queue);
        let config = if create {
            // A queue stream made before the topic's limits were known (an append) has none;
            // prepare_topic gives both the topic's.
            let limits = match self.queue_stream(topic, queue, false).await? {
                Some(mut s) => {
                    let c = &s.info().await.map_err(|e| js_err(&name, e))?.config;
                    QueueLimits {
                        max_age_ms: (!c.max_age.is_zero())
                            .then(|| u64::try_from(c.max_age.as_millis()).unwrap_or(u64::MAX)),
                        max_bytes: None,
                    }
                }
                None => QueueLimits::default(),
            };
            Some(self.index_config(topic, queue, limits))
        } else {
            None
        };
        self.cached_stream(&self.index_streams, (topic, queue), name, config)
            .await
    }

    /// Gives a queue's index stream the queue's age limit (creating it if missing).
    pub(super) async fn prepare_index(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
    ) -> Result<(), StorageError> {
        let stream = self.index_stream(topic, queue, false).await?;
        let wanted = self.index_config(topic, queue, limits);
        self.apply_limits(&self.index_streams, (topic, queue), stream, wanted)
            .await
    }

    /// The index entries of appended messages whose ids carry their place (the others go to
    /// the global index): one per id, one per business key, each published with a
    /// `Nats-Msg-Id`, so a retried append writes it once within the duplicate window.
    pub(super) async fn index_entries(
        &self,
        topic: &str,
        messages: &[&NewMessage],
        appended: &[&Appended],
    ) -> Result<Vec<futures::future::BoxFuture<'static, Result<u64, String>>>, StorageError> {
        let mut pending = Vec::new();
        for (m, a) in messages.iter().zip(appended) {
            self.index_stream(topic, a.queue, true).await?;
            let offset =
                rmp_serde::to_vec(&a.offset).map_err(|e| StorageError::Encode(e.to_string()))?;
            let mut entries = vec![(id_subject(topic, a.queue, &m.id), format!("{}:i", m.id))];
            if let Some(key) = &m.key {
                entries.push((key_subject(topic, a.queue, key), format!("{}:k", m.id)));
            }
            for (subject, msg_id) in entries {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                pending.push(self.publish_future(subject, headers, offset.clone()));
            }
        }
        Ok(pending)
    }

    /// The message an id made by [`crate::storage::message_id_for`] names, from the index
    /// streams of its queue whose topic has its tag (one request lists them, one direct get
    /// each). `None`: not there (deleted, or an id made otherwise).
    pub(super) async fn located(
        &self,
        id: &MessageId,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let Some((tag, queue)) = crate::storage::id_locator(id) else {
            return Ok(None);
        };
        // Every topic's index stream of this queue number, a page (JetStream's 1 024) at a time.
        let filter = format!("wqx.*.{queue}.i.{id}");
        let mut names = Vec::new();
        loop {
            let answer: serde_json::Value = self
                .js
                .request(
                    "STREAM.NAMES",
                    &serde_json::json!({"subject": filter, "offset": names.len()}),
                )
                .await
                .map_err(|e| js_err("index streams", e))?;
            if let Some(error) = answer.get("error") {
                return Err(js_err("index streams", error));
            }
            let page = answer["streams"].as_array().cloned().unwrap_or_default();
            let total = answer["total"].as_u64().unwrap_or(0);
            let more = !page.is_empty() && ((names.len() + page.len()) as u64) < total;
            names.extend(page);
            if !more {
                break;
            }
        }
        let suffix = format!("_{queue}");
        for name in names.iter().filter_map(|n| n.as_str()) {
            let Some(topic) = name
                .strip_prefix("WQX_")
                .and_then(|n| n.strip_suffix(&suffix))
                .and_then(|t| dec(t).ok())
            else {
                continue;
            };
            if crate::storage::topic_tag(&topic) != tag {
                continue;
            }
            let Some(stream) = self.index_stream(&topic, queue, false).await? else {
                continue;
            };
            let subject = id_subject(&topic, queue, id);
            let entry = match stream.direct_get_last_for_subject(&subject).await {
                Ok(entry) => entry,
                // A replica may not have applied the newest entries yet: the leader is asked,
                // so a message is found by id as soon as its append was acknowledged.
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                    match stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(entry) => entry,
                        Err(e) if no_message(&e) => continue,
                        Err(e) => return Err(js_err("id lookup", e)),
                    }
                }
                Err(e) => return Err(js_err("id lookup", e)),
            };
            let offset: u64 = rmp_serde::from_slice(&entry.payload)
                .map_err(|e| StorageError::Corrupt(format!("id index {id}: {e}")))?;
            if let Some(m) = self.message_at(&topic, queue, offset).await? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Messages of `topic` with business key `key` from its queues' index streams, oldest
    /// first per queue, at most `limit`.
    pub(super) async fn keyed(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let mut out = Vec::new();
        // Queues are numbered from 0 up; the first without an index stream ends them.
        for queue in 0u32.. {
            if out.len() >= limit {
                break;
            }
            let Some(stream) = self.index_stream(topic, queue, false).await? else {
                break;
            };
            let found = self
                .scan(&stream, key_subject(topic, queue, key), limit - out.len())
                .await?;
            for m in found {
                let offset: u64 = rmp_serde::from_slice(&m.payload)
                    .map_err(|e| StorageError::Corrupt(format!("key index: {e}")))?;
                out.extend(self.read_one(topic, queue, offset).await?);
            }
        }
        Ok(out)
    }

    /// Deletes the index entries of a queue whose messages are all below its low water, and
    /// returns that low water: records a checkpoint (the index's last sequence, then the
    /// queue's low and high water, in one stream info) and purges the index up to the newest
    /// checkpoint whose high water is at most the low water. Two or three requests per call,
    /// none per entry; entries of messages just deleted go by the next call whose checkpoint
    /// is behind the low water.
    pub(super) async fn purge_index(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        let Some(mut index) = self.index_stream(topic, queue, false).await? else {
            return self.low_water(topic, queue).await;
        };
        let state = index
            .info()
            .await
            .map_err(|e| js_err("index purge", e))?
            .state
            .clone();
        let QueueExtent {
            low_water: low,
            high_water: high,
            ..
        } = self.extent(topic, queue).await?;
        let cut = {
            let mut all = self
                .index_checkpoints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let points = all.entry((topic.to_string(), queue)).or_default();
            if points
                .back()
                .is_none_or(|&(seq, _)| seq < state.last_sequence)
            {
                if points.len() >= CHECKPOINTS {
                    // Every second one goes: the rest still spans the whole time since the
                    // oldest, more coarsely.
                    let mut i = 0;
                    points.retain(|_| {
                        i += 1;
                        i % 2 == 1
                    });
                }
                points.push_back((state.last_sequence, high));
            }
            let mut cut = None;
            while let Some(&(seq, h)) = points.front() {
                if h > low {
                    break;
                }
                cut = Some(seq);
                points.pop_front();
            }
            cut
        };
        if let Some(seq) = cut
            && seq >= state.first_sequence
        {
            index
                .purge()
                .sequence(seq + 1)
                .await
                .map_err(|e| js_err("index purge", e))?;
        }
        Ok(low)
    }
}
