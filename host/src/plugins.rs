//! The plugin catalogue: uploaded components by name and version, their bytes (in storage,
//! once per digest), compiled artifacts (a per-node cache on local disk, by digest and engine)
//! and the compiled code in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::sync::OnceCell;

use crate::base::{check_name, now_ms};
use crate::runtime::host::{KvOwner, kv_space};
use crate::runtime::{
    CompileError, InstanceContext, InvokeError, PluginCode, PluginLimits, PoolKey, Runtime,
};
use crate::storage::{Expect, Storage, StorageError};

const PLUGIN_SPACE: &str = "plugin";

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin name: {0}")]
    BadName(String),
    #[error("plugin {0:?} does not exist")]
    Unknown(String),
    #[error("plugin {name:?} has no version {version}")]
    UnknownVersion { name: String, version: u32 },
    #[error("the plugin has {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("plugin limits: {0}")]
    BadLimits(String),
    #[error("plugin {name:?} is used by subscription {group:?}")]
    InUse { name: String, group: String },
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// One uploaded version of a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PluginVersion {
    pub version: u32,
    /// SHA-256 of the component bytes, hex.
    pub digest: String,
    pub size: usize,
    pub exports: Vec<String>,
    pub uploaded_at: u64,
    /// Limits set at upload; unset ones take `[plugins]` defaults.
    #[serde(default)]
    pub limits: PluginLimits,
}

/// Every version of one plugin, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginRecord {
    pub name: String,
    pub versions: Vec<PluginVersion>,
}

impl PluginRecord {
    pub fn latest(&self) -> Option<&PluginVersion> {
        self.versions.last()
    }
}

/// Compiled artifacts on this node's disk, by digest and engine version. Only a cache: a node
/// lacking one compiles the stored bytes again, so shared storage never carries machine code
/// and nodes with different engines can share one backend.
#[derive(Clone)]
struct Artifacts {
    dir: std::path::PathBuf,
}

impl Artifacts {
    fn path(&self, digest: &str, engine: &str) -> std::path::PathBuf {
        self.dir.join(format!("{digest}-{engine}.cwasm"))
    }

    async fn get(&self, digest: &str, engine: &str) -> Option<Vec<u8>> {
        match tokio::fs::read(self.path(digest, engine)).await {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read a cached artifact; compiling");
                None
            }
        }
    }

    /// Written under a temporary name and renamed, so a crash never leaves half an artifact.
    async fn put(&self, digest: &str, engine: &str, artifact: &[u8]) {
        let path = self.path(digest, engine);
        let tmp = path.with_extension(format!("tmp{}", uuid::Uuid::now_v7().simple()));
        let written = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            tokio::fs::write(&tmp, artifact).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            tracing::warn!(%digest, error = %e, "cannot cache an artifact; it is compiled again next start");
        }
    }

    async fn remove(&self, digest: &str, engine: &str) {
        let _ = tokio::fs::remove_file(self.path(digest, engine)).await;
    }
}

pub struct Plugins {
    runtime: Arc<Runtime>,
    storage: Arc<dyn Storage>,
    artifacts: Artifacts,
    max_bytes: usize,
    /// Compiled code by digest; the cell makes concurrent loads of one digest load it once.
    code: Mutex<HashMap<String, Arc<OnceCell<Arc<PluginCode>>>>>,
    /// Compiles under way by digest, shared by every upload of the same bytes. A compile runs
    /// to its end even when its client gives up; its artifact is then on disk for the retry.
    compiling: Mutex<HashMap<String, SharedCompile>>,
    /// Digests whose compile ran out of its budget: a retry is refused at once, not compiled
    /// again (cleared at restart, e.g. after raising `[plugins] compile_timeout_ms`).
    over_budget: Arc<Mutex<HashMap<String, CompileError>>>,
}

type SharedCompile = futures::future::Shared<
    futures::future::BoxFuture<'static, Result<Arc<PluginCode>, CompileError>>,
>;

/// Over-budget digests remembered at most; the oldest are forgotten first.
const MAX_OVER_BUDGET: usize = 256;

fn wasm_key(digest: &str) -> String {
    format!("wasm/{digest}")
}

impl Plugins {
    /// A catalogue over `storage`, caching compiled artifacts in `artifact_dir`.
    pub fn new(
        runtime: Arc<Runtime>,
        storage: Arc<dyn Storage>,
        max_bytes: usize,
        artifact_dir: std::path::PathBuf,
    ) -> Self {
        Self {
            runtime,
            storage,
            artifacts: Artifacts { dir: artifact_dir },
            max_bytes,
            code: Mutex::new(HashMap::new()),
            compiling: Mutex::new(HashMap::new()),
            over_budget: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Where older data directories kept artifacts in storage; cleared when the plugin goes.
    fn legacy_artifact_key(&self, digest: &str) -> String {
        format!("artifact/{digest}/{}", self.runtime.engine_key())
    }

    fn decode(name: &str, bytes: &[u8]) -> Result<PluginRecord, StorageError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StorageError::Corrupt(format!("plugin {name}: {e}")))
    }

    pub async fn get(&self, name: &str) -> Result<PluginRecord, PluginError> {
        validate_name(name)?;
        match self.storage.get_record(PLUGIN_SPACE, name).await? {
            Some(r) => Ok(Self::decode(name, &r.value)?),
            None => Err(PluginError::Unknown(name.to_string())),
        }
    }

    pub async fn list(&self) -> Result<Vec<PluginRecord>, PluginError> {
        let records = self
            .storage
            .list_records(PLUGIN_SPACE, "", usize::MAX)
            .await?;
        Ok(records
            .iter()
            .map(|(k, r)| Self::decode(k, &r.value))
            .collect::<Result<_, _>>()?)
    }

    /// Validates, compiles and stores a component as the plugin's next version. Uploading the
    /// bytes of the latest version again changes nothing and returns it (`false`).
    pub async fn upload(
        &self,
        name: &str,
        bytes: Vec<u8>,
        limits: PluginLimits,
    ) -> Result<(PluginVersion, bool), PluginError> {
        validate_name(name)?;
        let config = self.runtime.config();
        limits.validate().map_err(PluginError::BadLimits)?;
        if let Some(mb) = limits.memory_mb
            && mb.saturating_mul(1 << 20) > config.memory_bytes as u64
        {
            return Err(PluginError::BadLimits(format!(
                "memory_mb {mb} is above this server's [plugins] memory_mb ({} MiB)",
                config.memory_bytes >> 20
            )));
        }
        if bytes.len() > self.max_bytes {
            return Err(PluginError::TooLarge {
                len: bytes.len(),
                max: self.max_bytes,
            });
        }
        let digest = crate::base::hex(&sha2::Sha256::digest(&bytes));
        let code = match self.cached(&digest) {
            Some(code) => code,
            None => {
                let code = match self.cached_artifact("(upload)", &digest).await {
                    Some(code) => code,
                    None => self.compile_once(&digest, bytes.clone()).await?,
                };
                self.storage
                    .put_blob(&wasm_key(&digest), Some(bytes.clone()))
                    .await?;
                self.cache(&digest, code.clone());
                code
            }
        };
        let exports: Vec<String> = code.exports().iter().map(|s| s.to_string()).collect();
        loop {
            let current = self.storage.get_record(PLUGIN_SPACE, name).await?;
            let (mut record, expect) = match &current {
                Some(r) => (Self::decode(name, &r.value)?, Expect::Revision(r.revision)),
                None => (
                    PluginRecord {
                        name: name.to_string(),
                        versions: Vec::new(),
                    },
                    Expect::Absent,
                ),
            };
            if let Some(latest) = record.latest()
                && latest.digest == digest
                && latest.limits == limits
            {
                return Ok((latest.clone(), false));
            }
            let version = PluginVersion {
                version: record.latest().map_or(1, |v| v.version + 1),
                digest: digest.clone(),
                size: bytes.len(),
                exports: exports.clone(),
                uploaded_at: now_ms(),
                limits,
            };
            record.versions.push(version.clone());
            let value =
                serde_json::to_vec(&record).map_err(|e| StorageError::Encode(e.to_string()))?;
            match self
                .storage
                .put_record(PLUGIN_SPACE, name, Some(value), expect)
                .await
            {
                Ok(_) => return Ok((version, true)),
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Removes a plugin and every version of it. `in_use` names a subscription still using it.
    pub async fn delete(&self, name: &str, in_use: Option<String>) -> Result<(), PluginError> {
        let record = self.get(name).await?;
        if let Some(group) = in_use {
            return Err(PluginError::InUse {
                name: name.to_string(),
                group,
            });
        }
        self.storage
            .put_record(PLUGIN_SPACE, name, None, Expect::Any)
            .await?;
        // Its shared kv state and the invoke API's go with it (issue 22): a plugin uploaded
        // later under the same name starts empty.
        for owner in [KvOwner::Plugin(name), KvOwner::Invoke(name)] {
            crate::storage::clear_space(self.storage.as_ref(), &kv_space(owner), "").await?;
        }
        self.drop_unused_code(&record.versions).await?;
        self.runtime.forget_plugin(name);
        Ok(())
    }

    /// Removes the versions of `name` beyond the newest `keep`, except those in `pinned`
    /// (versions subscriptions name), with their bytes and compiled artifacts when no other
    /// version of any plugin shares them. Returns the version numbers removed.
    pub async fn prune(
        &self,
        name: &str,
        keep: usize,
        pinned: &[u32],
    ) -> Result<Vec<u32>, PluginError> {
        loop {
            let Some(current) = self.storage.get_record(PLUGIN_SPACE, name).await? else {
                return Ok(Vec::new());
            };
            let mut record = Self::decode(name, &current.value)?;
            let cut = record.versions.len().saturating_sub(keep);
            let (old, newest) = record.versions.split_at(cut);
            let (kept, gone): (Vec<_>, Vec<_>) = old
                .iter()
                .cloned()
                .partition(|v| pinned.contains(&v.version));
            if gone.is_empty() {
                return Ok(Vec::new());
            }
            record.versions = kept.into_iter().chain(newest.iter().cloned()).collect();
            let value =
                serde_json::to_vec(&record).map_err(|e| StorageError::Encode(e.to_string()))?;
            match self
                .storage
                .put_record(
                    PLUGIN_SPACE,
                    name,
                    Some(value),
                    Expect::Revision(current.revision),
                )
                .await
            {
                Ok(_) => {
                    self.drop_unused_code(&gone).await?;
                    return Ok(gone.iter().map(|v| v.version).collect());
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Drops the bytes and compiled artifacts of `versions` that no stored version of any
    /// plugin references any more (bytes are shared by digest).
    async fn drop_unused_code(&self, versions: &[PluginVersion]) -> Result<(), PluginError> {
        let still_used: std::collections::HashSet<String> = self
            .list()
            .await?
            .iter()
            .flat_map(|r| r.versions.iter().map(|v| v.digest.clone()))
            .collect();
        for v in versions {
            if !still_used.contains(&v.digest) {
                self.storage.put_blob(&wasm_key(&v.digest), None).await?;
                self.storage
                    .put_blob(&self.legacy_artifact_key(&v.digest), None)
                    .await?;
                self.artifacts
                    .remove(&v.digest, &self.runtime.engine_key())
                    .await;
                if let Ok(mut code) = self.code.lock() {
                    code.remove(&v.digest);
                }
            }
        }
        Ok(())
    }

    fn cell(&self, digest: &str) -> Arc<OnceCell<Arc<PluginCode>>> {
        match self.code.lock() {
            Ok(mut c) => c.entry(digest.to_string()).or_default().clone(),
            Err(_) => Arc::new(OnceCell::new()),
        }
    }

    fn cached(&self, digest: &str) -> Option<Arc<PluginCode>> {
        self.code.lock().ok()?.get(digest)?.get().cloned()
    }

    fn cache(&self, digest: &str, code: Arc<PluginCode>) {
        let _ = self.cell(digest).set(code);
    }

    /// The compiled code of a version (the latest if `None`): from memory, else from the stored
    /// artifact, else compiled again from the stored bytes (after an engine upgrade).
    pub async fn code(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(PluginVersion, Arc<PluginCode>), PluginError> {
        let record = self.get(name).await?;
        let v = match version {
            Some(n) => record.versions.iter().find(|v| v.version == n),
            None => record.latest(),
        }
        .cloned()
        .ok_or_else(|| PluginError::UnknownVersion {
            name: name.to_string(),
            version: version.unwrap_or(0),
        })?;
        let code = self
            .cell(&v.digest)
            .get_or_try_init(|| self.load(name, &v))
            .await?
            .clone();
        Ok((v, code))
    }

    /// The code of `digest` from this node's artifact cache, if it is there and loads.
    async fn cached_artifact(&self, name: &str, digest: &str) -> Option<Arc<PluginCode>> {
        let runtime = self.runtime.clone();
        let artifact = self.artifacts.get(digest, &runtime.engine_key()).await?;
        match tokio::task::spawn_blocking(move || runtime.load_artifact(&artifact)).await {
            Ok(Ok(code)) => Some(code),
            // A damaged cache file is compiled again, not fatal.
            Ok(Err(e)) => {
                tracing::warn!(plugin = %name, error = %e, "cached artifact unusable");
                None
            }
            Err(e) => {
                tracing::warn!(plugin = %name, error = %e, "loader task failed");
                None
            }
        }
    }

    /// Compiles `bytes` (of `digest`) within the runtime's compile limits, once however many
    /// callers ask at the same time. The compile is detached from its callers: it finishes and
    /// caches its artifact even if they all give up (a client's timeout), so a retry finds it.
    async fn compile_once(
        &self,
        digest: &str,
        bytes: Vec<u8>,
    ) -> Result<Arc<PluginCode>, CompileError> {
        use futures::FutureExt as _;
        let lock = |m: &Mutex<HashMap<String, CompileError>>| {
            m.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(digest)
                .cloned()
        };
        if let Some(e) = lock(&self.over_budget) {
            return Err(e);
        }
        let shared = {
            let mut compiling = self
                .compiling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            compiling
                .entry(digest.to_string())
                .or_insert_with(|| {
                    let (runtime, artifacts) = (self.runtime.clone(), self.artifacts.clone());
                    let (over_budget, digest) = (self.over_budget.clone(), digest.to_string());
                    let task = tokio::spawn(async move {
                        let (code, artifact) = match runtime.compile_bounded(bytes).await {
                            Ok(c) => c,
                            Err(e) => {
                                if matches!(e, CompileError::Budget(_)) {
                                    let mut m = over_budget
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    if m.len() >= MAX_OVER_BUDGET {
                                        m.clear();
                                    }
                                    m.insert(digest, e.clone());
                                }
                                return Err(e);
                            }
                        };
                        artifacts
                            .put(&digest, &runtime.engine_key(), &artifact)
                            .await;
                        Ok(code)
                    });
                    async move {
                        task.await.unwrap_or_else(|e| {
                            Err(CompileError::Invalid(format!("compiler task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = shared.await;
        self.compiling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(digest);
        result
    }

    async fn load(&self, name: &str, v: &PluginVersion) -> Result<Arc<PluginCode>, PluginError> {
        if let Some(code) = self.cached_artifact(name, &v.digest).await {
            return Ok(code);
        }
        let bytes = self
            .storage
            .get_blob(&wasm_key(&v.digest))
            .await?
            .ok_or_else(|| {
                StorageError::Corrupt(format!("bytes of plugin {name} v{} are missing", v.version))
            })?;
        Ok(self.compile_once(&v.digest, bytes).await?)
    }

    /// Loads the latest version of every plugin, so the first message after a restart does not
    /// pay for it. Failures are logged, not fatal: the plugin is loaded again on first use.
    pub async fn warm_up(&self) {
        let Ok(records) = self.list().await else {
            return;
        };
        for r in records {
            if let Err(e) = self.code(&r.name, None).await {
                tracing::warn!(plugin = %r.name, error = %e, "cannot load plugin at start-up");
            }
        }
    }

    /// Calls `handle` on an instance of the plugin outside any subscription (the invoke API),
    /// on the plugin threads: an instance from the runtime's pool for the same plugin version,
    /// configuration and grants is reused; a failed one is dropped and replaced next time.
    pub async fn invoke(
        &self,
        name: &str,
        version: Option<u32>,
        ctx: InstanceContext,
        message: crate::bindings::Message,
    ) -> Result<(PluginVersion, Result<crate::bindings::Outcome, InvokeError>), PluginError> {
        let (v, code) = self.code(name, version).await?;
        if !code.has_consumer() {
            return Err(InvokeError::MissingExport(crate::bindings::CONSUMER_EXPORT).into());
        }
        let key = PoolKey {
            plugin: name.to_string(),
            version: v.version,
            owner: format!("invoke/{}|{:?}", ctx.config_json, ctx.grants),
        };
        let ctx = Arc::new(InstanceContext {
            version: v.version,
            limits: v.limits,
            ..ctx
        });
        let runtime = self.runtime.clone();
        let outcome = self
            .runtime
            .spawn(async move {
                let mut lease = runtime.lease(key, &code, || ctx).await?;
                lease.handle(&message).await
            })
            .await
            .unwrap_or_else(|e| Err(InvokeError::Trap(format!("the call's task failed: {e}"))));
        Ok((v, outcome))
    }
}

/// Plugin names follow the topic name rules (they appear in URLs and storage keys).
pub fn validate_name(name: &str) -> Result<(), PluginError> {
    check_name(name).map_err(PluginError::BadName)
}
