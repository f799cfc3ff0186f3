//! Publishing: validating and stamping messages, the disk-quota reservation, idempotent
//! publishes (a key remembered with a digest of its request) and batches.

use super::*;

/// What an idempotency key remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct IdempotentPublish {
    pub(super) at: u64,
    appended: Appended,
    /// SHA-256 (hex) of what the request asked to store ([`request_digest`]); absent in
    /// records written before digests were kept, which match any request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
}

/// What makes two publishes "the same request" for an idempotency key: body (and its kind),
/// business key, tag, sharding key and properties. Not the timing (`delay_ms` is relative to
/// each attempt), as payment APIs compare request parameters.
pub(super) fn request_digest(m: &NewMessage) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(&[u8::from(m.body_kind == crate::storage::BodyKind::Json)]);
    field(&m.body);
    for f in [&m.key, &m.tag, &m.sharding_key] {
        match f {
            Some(v) => {
                field(b"some");
                field(v.as_bytes());
            }
            None => field(b"none"),
        }
    }
    for (k, v) in &m.properties {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    crate::base::hex(&h.finalize())
}

/// What a stored record costs beyond its value: key, revision, log and index entries.
pub(super) const RECORD_OVERHEAD: u64 = 64;

/// An estimate of the bytes a message takes on disk (write-ahead log and table, before
/// compression): its fields plus the id and business-key index entries.
pub(super) fn stored_size(m: &NewMessage) -> u64 {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let properties: usize = m.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
    let fields =
        m.body.len() + 2 * text(&m.key) + text(&m.tag) + text(&m.sharding_key) + properties;
    (fields as u64).saturating_add(2 * RECORD_OVERHEAD)
}

impl Broker {
    /// Validates an envelope for `topic` and binds it to a queue, without storing it (a
    /// transaction's half message is stored elsewhere until commit).
    pub async fn prepare_message(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> Result<NewMessage, BrokerError> {
        let t = self.topic_for_publish(topic).await?;
        let message = self.prepare(&t, envelope, now_ms())?;
        self.reserve_disk(std::slice::from_ref(&message))?;
        Ok(message)
    }

    /// Turns a validated envelope into a message bound for a queue of `topic`.
    pub(super) fn prepare(
        &self,
        topic: &CachedTopic,
        envelope: Envelope,
        now: u64,
    ) -> Result<NewMessage, EnvelopeError> {
        let checked = envelope.check(&self.limits, now)?;
        let queues = topic.meta.queues;
        let queue = match &checked.sharding_key {
            Some(k) => queue_for_key(k, queues),
            None => topic.cursor.fetch_add(1, Ordering::Relaxed) % queues,
        };
        Ok(NewMessage {
            id: crate::storage::message_id_for(&topic.meta.name, queue),
            queue,
            key: checked.key,
            tag: checked.tag,
            sharding_key: checked.sharding_key,
            properties: checked.properties,
            body_kind: checked.body_kind,
            body: checked.body,
            born_at: now,
            deliver_at: checked.deliver_at,
        })
    }

    pub(super) async fn topic_for_publish(
        &self,
        name: &str,
    ) -> Result<Arc<CachedTopic>, BrokerError> {
        validate_topic_name(name)?;
        if let Some(disk) = &self.disk {
            disk.check()?;
        }
        self.lookup(name).await
    }

    /// Reserves room on disk for messages about to be stored (see [`crate::disk::DiskGuard`]);
    /// refused with [`BrokerError::DiskFull`] once the quota or free-space floor is reached.
    pub(super) fn reserve_disk(&self, messages: &[NewMessage]) -> Result<(), BrokerError> {
        if let Some(disk) = &self.disk {
            disk.reserve(
                messages
                    .iter()
                    .map(stored_size)
                    .fold(0, u64::saturating_add),
            )?;
        }
        Ok(())
    }

    /// Reserves room on disk for a record write of `bytes` (a plugin's kv value).
    pub fn reserve_disk_bytes(&self, bytes: u64) -> Result<(), BrokerError> {
        if let Some(disk) = &self.disk {
            disk.reserve(bytes.saturating_add(RECORD_OVERHEAD))?;
        }
        Ok(())
    }

    /// Publishes one message; returns once it is durable.
    pub async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Appended, BrokerError> {
        let started = std::time::Instant::now();
        let _topic_stays = self.deletion.read().await;
        let t = self.topic_for_publish(topic).await?;
        let message = self.prepare(&t, envelope, now_ms())?;
        self.reserve_disk(std::slice::from_ref(&message))?;
        let size = (1, message.body.len());
        let mut out = self.storage.append(topic, vec![message]).await?;
        self.observe(topic, crate::metrics::PublishKind::single, size, started);
        out.pop().ok_or_else(|| {
            BrokerError::Storage(StorageError::Corrupt("append returned nothing".into()))
        })
    }

    /// Publishes once per idempotency key (within `limits.idempotency_window_ms`): the message
    /// and the key's record are written in one atomic step; a retry with the same key gets the
    /// original answer back (`true` = replayed) and stores nothing.
    pub async fn publish_idempotent(
        &self,
        topic: &str,
        key: &str,
        envelope: Envelope,
    ) -> Result<(Appended, bool), BrokerError> {
        if key.is_empty() || key.len() > 256 {
            return Err(BrokerError::BadIdempotencyKey);
        }
        let started = std::time::Instant::now();
        let _topic_stays = self.deletion.read().await;
        let t = self.topic_for_publish(topic).await?;
        let now = now_ms();
        let message = self.prepare(&t, envelope, now)?;
        let digest = request_digest(&message);
        let space = idempotency_space(topic);
        loop {
            let expect = match self.storage.get_record(&space, key).await? {
                Some(r) => {
                    let seen: IdempotentPublish = serde_json::from_slice(&r.value)
                        .map_err(|e| StorageError::Corrupt(format!("idempotency record: {e}")))?;
                    if now.saturating_sub(seen.at) < self.limits.idempotency_window_ms {
                        if seen.digest.as_ref().is_some_and(|d| *d != digest) {
                            return Err(BrokerError::IdempotencyKeyReused(key.to_string()));
                        }
                        let original = self
                            .storage
                            .message_by_id(seen.appended.id)
                            .await?
                            .ok_or_else(|| BrokerError::IdempotentMessageDeleted {
                                key: key.to_string(),
                                id: seen.appended.id,
                            })?;
                        let appended = Appended {
                            id: original.message.id,
                            queue: original.message.queue,
                            offset: original.offset,
                        };
                        return Ok((appended, true));
                    }
                    Expect::Revision(r.revision)
                }
                None => Expect::Absent,
            };
            // Only what will be stored reserves room (a replay stores nothing).
            self.reserve_disk(std::slice::from_ref(&message))?;
            // The record names the message id; queue and offset are known only after the
            // append, so they are looked up by id when the key is replayed.
            let record = IdempotentPublish {
                at: now,
                appended: Appended {
                    id: message.id,
                    queue: message.queue,
                    offset: 0,
                },
                digest: Some(digest.clone()),
            };
            let guard = RecordWrite {
                space: space.clone(),
                key: key.to_string(),
                value: Some(
                    serde_json::to_vec(&record).map_err(|e| StorageError::Encode(e.to_string()))?,
                ),
                expect,
            };
            // The key's expiry entry goes into the same group commit; one whose publish fails
            // is dropped by the sweep, which checks the record it names.
            let (expiry_space, expiry_key) = (expiry_space(topic), expiry_key(now, key));
            let (appended, expiry) = tokio::join!(
                self.storage
                    .append_guarded(topic, vec![message.clone()], guard),
                self.storage
                    .put_record(&expiry_space, &expiry_key, Some(Vec::new()), Expect::Any,)
            );
            // The retention pass visits the topic's keys by the time this one expires; also
            // after an error, which may still have stored the entry (a failed group commit can
            // be in the WAL), and a visit too many costs one read.
            self.idempotency_due.added(
                topic,
                Some(now.saturating_add(self.limits.idempotency_window_ms)),
            );
            if let Err(e) = expiry {
                tracing::warn!(%topic, %key, error = %e, "cannot index an idempotency key for expiry; it stays until the topic goes");
            }
            match appended {
                Ok((mut out, _)) => {
                    self.observe(
                        topic,
                        crate::metrics::PublishKind::idempotent,
                        (1, message.body.len()),
                        started,
                    );
                    let appended = out
                        .pop()
                        .ok_or_else(|| StorageError::Corrupt("append returned nothing".into()))?;
                    return Ok((appended, false));
                }
                // Another publish with this key won the race: answer as it did.
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Publishes a batch in one group commit: all messages or, on any invalid one, none.
    pub async fn publish_batch(
        &self,
        topic: &str,
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Appended>, BrokerError> {
        let started = std::time::Instant::now();
        let _topic_stays = self.deletion.read().await;
        let t = self.topic_for_publish(topic).await?;
        if envelopes.is_empty() {
            return Err(BrokerError::EmptyBatch);
        }
        if envelopes.len() > self.limits.max_batch {
            return Err(BrokerError::BatchTooLarge {
                len: envelopes.len(),
                max: self.limits.max_batch,
            });
        }
        let now = now_ms();
        let messages = envelopes
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                self.prepare(&t, e, now)
                    .map_err(|source| BrokerError::InBatch { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.reserve_disk(&messages)?;
        // Sizes are counted before the messages move into the write.
        let size = (messages.len(), messages.iter().map(|m| m.body.len()).sum());
        let out = self.storage.append(topic, messages).await?;
        self.observe(topic, crate::metrics::PublishKind::batch, size, started);
        Ok(out)
    }
}

/// The record space of a topic's idempotency keys.
pub(super) fn idempotency_space(topic: &str) -> String {
    format!("idem/{topic}")
}

/// The record space naming a topic's idempotency keys by the time they were stored, so the
/// sweep reads them oldest first and stops at the first one still in its window.
pub(super) fn expiry_space(topic: &str) -> String {
    format!("idem-expiry/{topic}")
}

/// `{at:016x}/{key}`: sorts by store time (ms since the epoch).
fn expiry_key(at: u64, key: &str) -> String {
    format!("{at:016x}/{key}")
}

/// Expiry entries the sweep reads at once.
const EXPIRY_PAGE: usize = 256;

impl Broker {
    /// Forgets when deleted topics' idempotency keys expire (see [`Broker::expire_idempotency_keys`]).
    pub fn forget_deleted_topics(&self) {
        let Ok(topics) = self.topics.read() else {
            return;
        };
        self.idempotency_due.retain(|t| topics.contains_key(t));
    }

    /// Deletes the idempotency records of `topic` stored `limits.idempotency_window_ms` or
    /// longer before `now` (ms since the epoch), oldest first, with their expiry entries; a key
    /// published again since keeps its newer record. Returns how many keys went. Records
    /// written before expiry entries existed are not seen (they go with the topic). A topic
    /// whose oldest key is still in its window, or that has none, is not read again until
    /// that key's window passes or a publish adds a key ([`crate::base::NextDue`]).
    pub async fn expire_idempotency_keys(&self, topic: &str, now: u64) -> Result<u64, BrokerError> {
        let Some(visit) = self.idempotency_due.visit(topic, now) else {
            return Ok(0);
        };
        let (space, expiry) = (idempotency_space(topic), expiry_space(topic));
        let mut n = 0;
        loop {
            let page = self.storage.list_records(&expiry, "", EXPIRY_PAGE).await?;
            if page.is_empty() {
                self.idempotency_due.learned(topic, visit, None, now);
                return Ok(n);
            }
            for (entry, _) in page {
                let parsed = entry
                    .split_once('/')
                    .and_then(|(at, key)| Some((u64::from_str_radix(at, 16).ok()?, key)));
                if let Some((at, key)) = parsed {
                    let expired = at
                        .checked_add(self.limits.idempotency_window_ms)
                        .is_some_and(|until| until <= now);
                    if !expired {
                        let next = at.saturating_add(self.limits.idempotency_window_ms);
                        self.idempotency_due.learned(topic, visit, Some(next), now);
                        return Ok(n);
                    }
                    if let Some(r) = self.storage.get_record(&space, key).await? {
                        let seen: Option<IdempotentPublish> = serde_json::from_slice(&r.value).ok();
                        if seen.is_none_or(|s| s.at == at) {
                            match self
                                .storage
                                .put_record(&space, key, None, Expect::Revision(r.revision))
                                .await
                            {
                                Ok(_) => n += 1,
                                // Published again meanwhile: the new record stays.
                                Err(StorageError::Conflict { .. }) => {}
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                }
                self.storage
                    .put_record(&expiry, &entry, None, Expect::Any)
                    .await?;
            }
        }
    }
}
