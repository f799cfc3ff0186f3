//! Writes on JetStream: appends on their id subjects with their key index entries, record
//! writes by revision,
//! and the intents that make a guarded append (messages and a record in different streams)
//! finish after a writer died halfway.

use super::*;

impl JetStreamStorage {
    pub(super) async fn publish_acked(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> Result<Result<u64, PublishErrorKind>, StorageError> {
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await;
        let ack = match ack {
            Ok(future) => future.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(a) => Ok(Ok(a.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Err(e.kind())),
            Err(e) => Err(js_err("publish", e)),
        }
    }

    /// Appends without the closed check, for [`Self::finish_intents`] too.
    pub(super) async fn append_inner(
        &self,
        topic: &str,
        messages: &[NewMessage],
    ) -> Result<Vec<Appended>, StorageError> {
        let appended = match self.publish_messages(topic, messages).await? {
            Ok(appended) => appended,
            // A queue's stream was deleted, or narrowed by a node not yet upgraded, after this
            // node cached it: made (or widened) again and the whole batch sent again. What
            // was stored is stored once (its `Nats-Msg-Id`, within the duplicate window) and
            // keeps its offset. A refused message may so land after later ones of its batch
            // that another node's widening let through: the order a failed publish retried by
            // its producer had before this retry, possible only while a rolling upgrade races.
            Err(_) => self.publish_messages(topic, messages).await??,
        };
        self.index_and_announce(topic, messages, &appended).await?;
        Ok(appended)
    }

    /// Publishes `messages` on their id subjects, back to back on one connection (per queue,
    /// offsets follow the given order), and waits for every acknowledgement. The inner error:
    /// a queue's stream no longer binds the subject (its cache entry is dropped, so a second
    /// try makes or widens it again).
    async fn publish_messages(
        &self,
        topic: &str,
        messages: &[NewMessage],
    ) -> Result<Result<Vec<Appended>, StorageError>, StorageError> {
        let mut acks = Vec::with_capacity(messages.len());
        let mut ready: Vec<u32> = Vec::new();
        for m in messages {
            if !ready.contains(&m.queue) {
                self.append_stream(topic, m.queue).await?;
                ready.push(m.queue);
            }
            let payload = rmp_serde::to_vec(m).map_err(|e| StorageError::Encode(e.to_string()))?;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.to_string().as_str());
            let ack = self
                .js
                .publish_with_headers(id_subject(topic, m.queue, &m.id), headers, payload.into())
                .await
                .map_err(|e| js_err("append", e))?;
            acks.push(ack);
        }
        let mut appended = Vec::with_capacity(messages.len());
        let mut gone = None;
        for (m, ack) in messages.iter().zip(acks) {
            match ack.await {
                Ok(a) => appended.push(Appended {
                    id: m.id,
                    queue: m.queue,
                    offset: a.sequence.saturating_sub(1),
                }),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    self.streams
                        .lock()
                        .await
                        .remove(&(topic.to_string(), m.queue));
                    gone = Some(js_err("append", e));
                }
                Err(e) => return Err(js_err("append", e)),
            }
        }
        Ok(match gone {
            Some(e) => Err(e),
            None => Ok(appended),
        })
    }

    /// The index entries of appended messages, before the append is acknowledged (a retry
    /// rewrites them idempotently), then the news of the append to this node's watchers and
    /// the other nodes'.
    async fn index_and_announce(
        &self,
        topic: &str,
        messages: &[NewMessage],
        appended: &[Appended],
    ) -> Result<(), StorageError> {
        // Ids that carry their place are found by their subject, and their business keys go to
        // their queue's index stream; other ids (and their keys) go to the global index.
        let mut pending = Vec::new();
        let (mut located, mut located_at) = (Vec::new(), Vec::new());
        for (m, a) in messages.iter().zip(appended) {
            if crate::storage::id_locates(&m.id, topic, a.queue) {
                located.push(m);
                located_at.push(a);
                continue;
            }
            let location = rmp_serde::to_vec(&Location {
                topic: topic.to_string(),
                queue: a.queue,
                offset: a.offset,
            })
            .map_err(|e| StorageError::Encode(e.to_string()))?;
            let ids = self.ids.clone();
            let id = m.id.to_string();
            pending.push(
                async move {
                    ids.put(id, location.into())
                        .await
                        .map_err(|e| e.to_string())
                }
                .boxed(),
            );
            if let Some(key) = &m.key {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{}:k", m.id).as_str());
                let at = rmp_serde::to_vec(&(a.queue, a.offset))
                    .map_err(|e| StorageError::Encode(e.to_string()))?;
                let subject = format!("wqk.{}.{}", enc(topic), enc(key));
                pending.push(self.publish_future(subject, headers, at));
            }
        }
        pending.extend(self.index_entries(topic, &located, &located_at).await?);
        for r in futures::future::join_all(pending).await {
            r.map_err(|e| js_err("index", e))?;
        }
        self.watchers.bump(topic);
        // Other nodes' watchers; losing one only delays them until their next poll.
        let _ = self
            .client
            .publish(format!("wqn.{}", enc(topic)), bytes::Bytes::new())
            .await;
        Ok(())
    }

    pub(super) async fn write_record(
        &self,
        space: &str,
        key: &str,
        value: Option<Vec<u8>>,
        expect: Expect,
    ) -> Result<u64, StorageError> {
        let k = record_key(space, key);
        let subject = format!("$KV.{RECORDS}.{k}");
        let conflict = || StorageError::Conflict {
            space: space.to_string(),
            key: key.to_string(),
        };
        let current = || self.latest_record(&k);
        let mut expected = match expect {
            Expect::Any => None,
            Expect::Revision(r) => Some(r),
            Expect::Present => match current().await? {
                Some((revision, Some(_))) => Some(revision),
                _ => return Err(conflict()),
            },
            // Tried first as a key never written (no read: most keys written "absent" are
            // new); a deleted record's marker is its last revision, so the loop below reads
            // it and tries again after it.
            Expect::Absent => Some(0),
        };
        loop {
            let mut headers = HeaderMap::new();
            if value.is_none() {
                headers.insert("KV-Operation", "DEL");
            }
            if let Some(r) = expected {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    r.to_string().as_str(),
                );
            }
            let payload = value.clone().unwrap_or_default();
            match self
                .publish_acked(subject.clone(), headers, payload)
                .await?
            {
                Ok(revision) => return Ok(revision),
                Err(_) if expect == Expect::Absent => {
                    // Raced with a delete or create: decide again on what is there now.
                    match current().await? {
                        Some((revision, None)) => {
                            if expected == Some(revision) {
                                return Err(conflict());
                            }
                            expected = Some(revision);
                        }
                        _ => return Err(conflict()),
                    }
                }
                Err(_) => return Err(conflict()),
            }
        }
    }

    /// The first half of a guarded append: the intent (naming the messages), then the guard
    /// record. Returns the intent's id and the guard's revision. `lose_answer` (tests only)
    /// takes the guard write's answer as lost after it landed.
    pub(super) async fn guard_with_intent(
        &self,
        topic: &str,
        messages: &[NewMessage],
        guard: RecordWrite,
        lose_answer: bool,
    ) -> Result<(String, u64), StorageError> {
        let intent_id = uuid::Uuid::now_v7().to_string();
        let intent = rmp_serde::to_vec(&Intent {
            topic: topic.to_string(),
            messages: messages.to_vec(),
            space: guard.space.clone(),
            key: guard.key.clone(),
            value: guard.value.clone().unwrap_or_default(),
            guard_deletes: false,
            appends: Vec::new(),
            records: Vec::new(),
            writer: self.writer.clone(),
        })
        .map_err(|e| StorageError::Encode(e.to_string()))?;
        self.write_record(INTENTS, &intent_id, Some(intent), Expect::Absent)
            .await?;
        let written = self
            .write_record(&guard.space, &guard.key, guard.value, guard.expect)
            .await;
        let written = match written {
            Ok(_) if lose_answer => Err(StorageError::Unavailable(
                "the guard write's answer was lost (test)".into(),
            )),
            other => other,
        };
        match written {
            Ok(r) => Ok((intent_id, r)),
            Err(e) => Err(self.after_guard_error(&intent_id, e).await),
        }
    }

    /// What a failed guard write (a commit point) leaves of its intent `intent_id`, and the
    /// error to answer. A conflict wrote nothing: the intent goes. Any other error may have come
    /// after the guard was stored (its answer lost with the server that took it): the intent
    /// stays, and recovery decides by the guard whether the writes it names are finished or
    /// dropped. Deleting it on such an error lost a committed transaction's message: the retry
    /// found the transaction committed, nothing named the unfinished append, and the record
    /// moved on without it.
    pub(super) async fn after_guard_error(&self, intent_id: &str, e: StorageError) -> StorageError {
        if !matches!(e, StorageError::Conflict { .. }) {
            return e;
        }
        match self
            .write_record(INTENTS, intent_id, None, Expect::Any)
            .await
        {
            Ok(_) => e,
            // Left for recovery, which drops it: its guard is not there.
            Err(delete) => delete,
        }
    }

    /// What `expect` needs of `space/key` now, checked without writing: the record's current
    /// revision (0 when absent), or [`StorageError::Conflict`].
    pub(super) async fn check_condition(
        &self,
        space: &str,
        key: &str,
        expect: Expect,
    ) -> Result<u64, StorageError> {
        let current = self.get_record(space, key).await?.map(|r| r.revision);
        let holds = match expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
            Expect::Present => current.is_some(),
        };
        if holds {
            Ok(current.unwrap_or(0))
        } else {
            Err(StorageError::Conflict {
                space: space.to_string(),
                key: key.to_string(),
            })
        }
    }

    /// A guarded append by a writer that dies after its guard record was written: for tests
    /// of [`Storage::recover`].
    #[doc(hidden)]
    pub async fn guarded_append_dying_halfway(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<u64, StorageError> {
        self.guard_with_intent(topic, &messages, guard, false)
            .await
            .map(|(_, r)| r)
    }

    /// A guarded append whose guard record was written but whose answer was lost (the server
    /// that took it died before answering): for tests of what the error leaves to
    /// [`Storage::recover`].
    #[doc(hidden)]
    pub async fn guarded_append_answer_lost(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<u64, StorageError> {
        self.guard_with_intent(topic, &messages, guard, true)
            .await
            .map(|(_, r)| r)
    }

    /// A [`Storage::commit`] by a writer that dies right after its first record (the commit
    /// point) was written: for tests of [`Storage::recover`]. Takes no locks.
    #[doc(hidden)]
    pub async fn commit_dying_halfway(
        &self,
        commit: crate::storage::Commit,
    ) -> Result<(), StorageError> {
        let crate::storage::Commit {
            checks,
            records,
            appends,
        } = commit;
        self.commit_held(checks, records, appends, true, true)
            .await
            .map(drop)
    }

    /// Finishes guarded appends older than `age` whose record write happened but whose
    /// messages a dead node never appended; drops the others. Younger ones may belong to a
    /// live writer and are left to it. Returns how many were finished or dropped.
    pub(super) async fn finish_intents(
        &self,
        age: std::time::Duration,
        own_at_any_age: bool,
    ) -> Result<usize, StorageError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut done = 0;
        for (id, record) in self.list_inner(INTENTS, "", "", usize::MAX).await? {
            // Intent ids are v7 UUIDs: their time says how old they are.
            let born = uuid::Uuid::parse_str(&id)
                .ok()
                .and_then(|u| u.get_timestamp())
                .map(|t| {
                    let (secs, nanos) = t.to_unix();
                    std::time::Duration::new(secs, nanos)
                })
                .unwrap_or_default();
            let intent = decode_intent(&id, &record.value)?;
            let own = own_at_any_age && !self.writer.is_empty() && intent.writer == self.writer;
            if now.saturating_sub(born) < age && !own {
                continue;
            }
            self.finish_intent(&id, record.revision, intent, true)
                .await?;
            done += 1;
        }
        Ok(done)
    }

    /// Finishes one intent (see [`Self::finish_intents`]) and drops it. One whose guard was
    /// not written is dropped only when `drop_unheld` (its writer is gone); returns whether
    /// it was dropped. `intent_revision` is the intent record's revision (from the listing).
    ///
    /// The intent may be stale: its writer may have finished it since it was listed (or be
    /// finishing it now), and a later commit may have written the same keys. So a write the
    /// writer checked is made only over the revision it checked, and an unconditional one
    /// only over what the key held at the commit point: records share one stream, whose
    /// sequence orders every write, and a key written after the guard (by the writer's own
    /// finish, or by a later commit, which a finished commit would not have overwritten
    /// either) keeps that value. Before, an unconditional write was replayed over whatever
    /// was there, so a later commit's kv value could be replaced by an older one.
    async fn finish_intent(
        &self,
        id: &str,
        intent_revision: u64,
        intent: Intent,
        drop_unheld: bool,
    ) -> Result<bool, StorageError> {
        let guard = self
            .latest_record(&record_key(&intent.space, &intent.key))
            .await?;
        let held = match &guard {
            // A commit that completed a timer deleted it.
            None | Some((_, None)) => intent.guard_deletes,
            Some((_, Some(value))) => !intent.guard_deletes && *value == intent.value,
        };
        if !held && !drop_unheld {
            return Ok(false);
        }
        // The guard's revision; never before the intent, which is written first (a marker
        // purged since, or a deletion older than the intent, gives the intent's).
        let commit_point = guard.map_or(0, |(r, _)| r).max(intent_revision);
        if held {
            // Values before deletions, as `finish_rest` writes them.
            let (puts, deletes): (Vec<_>, Vec<_>) =
                intent.records.iter().partition(|w| w.value.is_some());
            for w in puts.into_iter().chain(deletes) {
                let expect = match w.revision {
                    Some(r) if r > 0 => Expect::Revision(r),
                    // Unchecked, or checked absent (a deletion marker reads as absent too):
                    // over the exact revision the key has now, if that is not past the commit
                    // point (`Absent` would write over a deletion made since).
                    checked => match self.latest_record(&record_key(&w.space, &w.key)).await? {
                        Some((r, _)) if r > commit_point => {
                            tracing::debug!(space = %w.space, key = %w.key, "a recovered commit's record was written after its commit point; that value is kept");
                            continue;
                        }
                        Some((_, Some(_))) if checked.is_some() => {
                            tracing::debug!(space = %w.space, key = %w.key, "a recovered commit's record changed since it was checked; the newer value is kept");
                            continue;
                        }
                        Some((r, _)) => Expect::Revision(r),
                        None => Expect::Revision(0),
                    },
                };
                let value = w.value.clone().map(serde_bytes::ByteBuf::into_vec);
                match self.write_record(&w.space, &w.key, value, expect).await {
                    Ok(_) => {}
                    // Written by the dead writer itself, or by a later one: theirs stays.
                    Err(StorageError::Conflict { .. }) => {
                        tracing::debug!(space = %w.space, key = %w.key, "a recovered commit's record changed since it was checked; the newer value is kept");
                    }
                    Err(e) => return Err(e),
                }
            }
            let topics = std::iter::once((intent.topic, intent.messages)).chain(intent.appends);
            for (topic, messages) in topics {
                let mut missing = Vec::new();
                for m in messages {
                    if self.message_by_id(m.id).await?.is_none() {
                        missing.push(m);
                    }
                }
                if !missing.is_empty() {
                    self.append_inner(&topic, &missing).await?;
                }
            }
        }
        self.write_record(INTENTS, id, None, Expect::Any).await?;
        Ok(true)
    }

    /// The guard keys in `space` of the intents still stored (see
    /// [`Storage::unfinished_commits`]); an intent that cannot be read counts as naming none.
    pub(super) async fn unfinished_commits(
        &self,
        space: &str,
    ) -> Result<std::collections::HashSet<String>, StorageError> {
        Ok(self
            .readable_intents()
            .await?
            .into_iter()
            .filter(|(_, _, intent)| intent.space == space)
            .map(|(_, _, intent)| intent.key)
            .collect())
    }

    /// Every intent stored, with its id and revision. One that cannot be decoded is logged and
    /// left out (to recovery): it must not stop the others, nor a caller that is retried until
    /// it succeeds.
    async fn readable_intents(&self) -> Result<Vec<(String, u64, Intent)>, StorageError> {
        let mut out = Vec::new();
        for (id, record) in self.list_inner(INTENTS, "", "", usize::MAX).await? {
            match decode_intent(&id, &record.value) {
                Ok(intent) => out.push((id, record.revision, intent)),
                Err(e) => tracing::warn!(%id, error = %e, "an intent cannot be read"),
            }
        }
        Ok(out)
    }

    /// Finishes, whatever their age, the commits whose guard was written and whose intent
    /// `which` picks; returns how many it finished.
    async fn finish_intents_where(
        &self,
        which: impl Fn(&Intent) -> bool,
    ) -> Result<usize, StorageError> {
        let mut done = 0;
        for (id, revision, intent) in self.readable_intents().await? {
            if which(&intent) && self.finish_intent(&id, revision, intent, false).await? {
                done += 1;
            }
        }
        Ok(done)
    }

    /// Finishes, whatever their age, the commits whose guard is a record of `space` with a key
    /// starting with `prefix` (the completion markers of a queue a node takes over; one
    /// record a retry found stored, see [`Storage::finish_commits_of`]), so what a dead owner
    /// or a lost answer left is complete before the queue moves past it. Only commits whose
    /// guard was written are touched, and finishing one a live writer is finishing too (or
    /// finished since the listing) is harmless: appends are skipped when their message
    /// exists, kv writes are made only over the revision the writer checked, or, unchecked
    /// ones, over what the key held at the commit point (see [`Self::finish_intent`]).
    pub(super) async fn finish_commits_of(
        &self,
        space: &str,
        prefix: &str,
    ) -> Result<usize, StorageError> {
        self.finish_intents_where(|intent| intent.space == space && intent.key.starts_with(prefix))
            .await
    }

    /// Takes the lock of kv space `space` for one commit, on every node sharing the storage:
    /// a record `__lock/{space}` written only if absent, holding when it lapses
    /// ([`LOCK_TTL_MS`] on) and who holds it. Held by someone else: waits (a few ms at a time)
    /// for it, or, once it lapsed (its holder died) or when an earlier run of this node (same
    /// `node_id`) holds it, takes it over and first finishes the commits the holder
    /// had made but not finished, so its kv writes land before anyone reads over them.
    /// Returns the lock record's revision, for [`Self::unlock_spaces`]. A lock still held
    /// after [`LOCK_WAIT`] is [`StorageError::Unavailable`] (the caller tries again later).
    pub(super) async fn lock_space(&self, space: &str) -> Result<u64, StorageError> {
        let waited = std::time::Instant::now();
        let mut pause = 1u64;
        loop {
            let lapses = crate::base::now_ms().saturating_add(LOCK_TTL_MS);
            // When it lapses, then who holds it: this node's name and this run's token.
            let mut value = lapses.to_be_bytes().to_vec();
            value.extend_from_slice(format!("{}\n{}", self.writer, self.run).as_bytes());
            match self
                .write_record(LOCKS, space, Some(value.clone()), Expect::Absent)
                .await
            {
                Ok(revision) => return Ok(revision),
                Err(StorageError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            if let Some(held) = self.get_record(LOCKS, space).await? {
                let (until, holder) = held.value.split_at(held.value.len().min(8));
                let until = <[u8; 8]>::try_from(until).map_or(0, u64::from_be_bytes);
                // An earlier run of this node (its fixed name, another run's token) is gone.
                let former_self = !self.writer.is_empty()
                    && std::str::from_utf8(holder)
                        .ok()
                        .and_then(|h| h.split_once('\n'))
                        .is_some_and(|(name, run)| name == self.writer && run != self.run);
                if until <= crate::base::now_ms() || former_self {
                    match self
                        .write_record(LOCKS, space, Some(value), Expect::Revision(held.revision))
                        .await
                    {
                        Ok(revision) => {
                            self.finish_commits_touching(space).await?;
                            return Ok(revision);
                        }
                        Err(StorageError::Conflict { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if waited.elapsed() > LOCK_WAIT {
                return Err(StorageError::Unavailable(format!(
                    "kv namespace {space} stayed locked by another writer for {} s",
                    LOCK_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            pause = (pause * 2).min(16);
        }
    }

    /// Gives back locks [`Self::lock_space`] took (each only if still this holder's).
    pub(super) async fn unlock_spaces(&self, held: &[(&str, u64)]) {
        for (space, revision) in held {
            if let Err(e) = self
                .write_record(LOCKS, space, None, Expect::Revision(*revision))
                .await
            {
                tracing::debug!(%space, error = %e, "a kv lock was not given back; it lapses");
            }
        }
    }

    /// Finishes the commits whose guard was written and that write kv space `space` (a dead
    /// lock holder's), whatever their age.
    async fn finish_commits_touching(&self, space: &str) -> Result<usize, StorageError> {
        self.finish_intents_where(|intent| intent.records.iter().any(|r| r.space == space))
            .await
    }
}

/// A stored intent (`id` names it in the error).
fn decode_intent(id: &str, value: &[u8]) -> Result<Intent, StorageError> {
    rmp_serde::from_slice(value).map_err(|e| StorageError::Corrupt(format!("intent {id}: {e}")))
}
