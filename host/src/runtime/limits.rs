//! What one instance may hold: the memory limiter over the sum of its linear memories and
//! tables, the WASI resource-table cap, and the errors a call ends with when it runs out of
//! memory or CPU.

/// The memory cap of one instance: the sum of all its linear memories and tables (a component
/// may hold many of each; the cap holds for their total, issue 22). A growth past it traps with
/// [`MemoryLimitExceeded`].
pub struct MemoryLimiter {
    pub max_bytes: usize,
    /// Bytes of all memories and tables so far.
    used: usize,
}

/// What one table element is counted as (a function or resource reference and its metadata).
const TABLE_ELEMENT_BYTES: usize = 16;
/// Most entries in an instance's WASI resource table (streams, pollables, fields…).
pub const MAX_RESOURCES: usize = 10_000;

impl MemoryLimiter {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, used: 0 }
    }

    fn grow(&mut self, current: usize, desired: usize) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            return Err(MemoryLimitExceeded {
                limit: self.max_bytes,
                asked: total,
            }
            .into());
        }
        self.used = total;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (asked for {asked})")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub asked: usize,
}

/// The CPU budget of the current call ran out.
#[derive(Debug, thiserror::Error)]
#[error("CPU deadline exceeded")]
pub struct DeadlineExceeded;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    /// Called for each memory's creation (from 0) and every growth.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current, desired)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(
            current.saturating_mul(TABLE_ELEMENT_BYTES),
            desired.saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_encoder::{MemorySection, MemoryType, Module, RefType, TableSection, TableType};

    fn instantiate(module: &[u8]) -> wasmtime::Result<()> {
        let engine = wasmtime::Engine::default();
        let module = wasmtime::Module::new(&engine, module)?;
        let mut store = wasmtime::Store::new(&engine, MemoryLimiter::new(64 << 20));
        store.limiter(|l| l);
        wasmtime::Instance::new(&mut store, &module, &[]).map(drop)
    }

    fn memories(n: u32, pages: u64) -> Vec<u8> {
        let mut section = MemorySection::new();
        for _ in 0..n {
            section.memory(MemoryType {
                minimum: pages,
                maximum: None,
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
        }
        let mut m = Module::new();
        m.section(&section);
        m.finish()
    }

    fn is_over(r: wasmtime::Result<()>) -> bool {
        r.is_err_and(|e| e.downcast_ref::<MemoryLimitExceeded>().is_some())
    }

    /// Issue 22's input: extra memories each under the cap used to add up past it (5 × 64 MiB
    /// with `memory_mb` 64). 256 pages are 16 MiB; the cap is 64 MiB.
    #[test]
    fn the_memory_cap_holds_for_the_sum_of_an_instances_memories() {
        instantiate(&memories(4, 256)).expect("4 × 16 MiB fit in 64 MiB");
        assert!(is_over(instantiate(&memories(5, 256))), "5 × 16 MiB do not");
        assert!(
            is_over(instantiate(&memories(2, 1024))),
            "2 × 64 MiB do not"
        );
    }

    #[test]
    fn tables_count_against_the_same_cap() {
        let table = |elements: u64| {
            let mut section = TableSection::new();
            section.table(TableType {
                element_type: RefType::FUNCREF,
                minimum: elements,
                maximum: None,
                table64: false,
                shared: false,
            });
            let mut m = Module::new();
            m.section(&section);
            m.finish()
        };
        instantiate(&table(1 << 20)).expect("16 MiB of table fits");
        assert!(
            is_over(instantiate(&table(5 << 20))),
            "80 MiB of table does not"
        );
    }
}
