//! The caching device-memory pool, apart from CUDA so its rules run (and are tested) on any
//! machine: the CUDA backend plugs in `cuMemAlloc` / `cuMemFree`, the tests a counting fake.
//!
//! Rules:
//! - Sizes round up to a class: multiples of a quarter of the size's power of two (at most 25 %
//!   waste, where powers of two wasted up to 50 %), at least 512 bytes; a freed block waits in its
//!   class's free list for the next request of that class.
//! - An allocation that fails (out of memory) is retried once after every cached block has been
//!   returned to the device (`trim`); only then is it an error. While a reserve is active (a graph
//!   is being captured) it is an error at once: trimming synchronises, which breaks a capture.
//! - A dropped pool returns every cached block to the device; blocks in use keep the pool alive.
//! - A [`Reserve`] is private memory, for a captured CUDA graph: blocks taken while it is active
//!   come back to it, not to the shared lists, so an eager allocation can never receive an
//!   address the graph writes on replay. Dropping the reserve (with the graph) gives its blocks
//!   back to the shared lists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Raw device memory.
pub trait RawAlloc: Send + Sync {
    /// A new block of exactly `bytes` bytes, or why not.
    fn malloc(&self, bytes: usize) -> Result<u64, String>;
    /// Returns a block `malloc` gave.
    fn free(&self, ptr: u64);
    /// Waits until no queued work can still use a block (before blocks are returned).
    fn sync(&self) {}
}

/// The class a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(512);
    let step = (1usize << (usize::BITS - 1 - b.leading_zeros())) / 4;
    b.div_ceil(step) * step
}

type FreeLists = HashMap<usize, Vec<u64>>;

pub struct Pool<A: RawAlloc> {
    alloc: A,
    free: Mutex<FreeLists>,
    /// Bytes taken from the device (in use or cached).
    held: Mutex<usize>,
}

/// One block; it goes back to its reserve or to the pool's lists when dropped.
pub struct Block<A: RawAlloc> {
    pool: Arc<Pool<A>>,
    reserve: Option<Arc<Reserve<A>>>,
    pub ptr: u64,
    pub class: usize,
}

/// Private memory of one captured graph (see the module docs).
pub struct Reserve<A: RawAlloc> {
    pool: Arc<Pool<A>>,
    free: Mutex<FreeLists>,
}

impl<A: RawAlloc> Pool<A> {
    pub fn new(alloc: A) -> Arc<Pool<A>> {
        Arc::new(Pool {
            alloc,
            free: Mutex::new(HashMap::new()),
            held: Mutex::new(0),
        })
    }

    /// Bytes held from the device, in use or cached.
    pub fn held(&self) -> usize {
        *self.held.lock().unwrap()
    }

    /// Bytes cached in the shared free lists.
    pub fn cached(&self) -> usize {
        let f = self.free.lock().unwrap();
        f.iter().map(|(c, v)| c * v.len()).sum()
    }

    /// Returns every cached block to the device; the bytes returned.
    pub fn trim(&self) -> usize {
        let blocks: Vec<(usize, Vec<u64>)> = self.free.lock().unwrap().drain().collect();
        if blocks.is_empty() {
            return 0;
        }
        self.alloc.sync();
        let mut bytes = 0;
        for (class, ptrs) in blocks {
            for p in ptrs {
                self.alloc.free(p);
                bytes += class;
            }
        }
        *self.held.lock().unwrap() -= bytes;
        bytes
    }

    /// A block of at least `bytes` bytes: from `reserve`'s lists, else the shared ones, else the
    /// device (retried once after `trim`). With a reserve, the block belongs to it from now on.
    pub fn take(
        self: &Arc<Self>,
        bytes: usize,
        reserve: Option<&Arc<Reserve<A>>>,
    ) -> Result<Block<A>, String> {
        let class = size_class(bytes);
        let block = |ptr| Block {
            pool: self.clone(),
            reserve: reserve.cloned(),
            ptr,
            class,
        };
        if let Some(p) = reserve.and_then(|r| pop(&r.free, class)) {
            return Ok(block(p));
        }
        if let Some(p) = pop(&self.free, class) {
            return Ok(block(p));
        }
        let ptr = match self.alloc.malloc(class) {
            Ok(p) => p,
            // While a graph is captured (a reserve is active) nothing may wait on the stream, and
            // trimming waits before it frees: the failure is returned, recoverable, instead.
            Err(e) if reserve.is_some() => {
                return Err(format!(
                    "out of memory allocating {class} bytes while capturing a graph ({} held): {e}",
                    self.held()
                ))
            }
            Err(_) => {
                self.trim();
                self.alloc.malloc(class).map_err(|e| {
                    format!(
                        "out of memory allocating {class} bytes ({} still held by tensors in \
                         use, after returning the cache): {e}",
                        self.held()
                    )
                })?
            }
        };
        *self.held.lock().unwrap() += class;
        Ok(block(ptr))
    }

    /// A new reserve drawing on this pool.
    pub fn reserve(self: &Arc<Self>) -> Arc<Reserve<A>> {
        Arc::new(Reserve {
            pool: self.clone(),
            free: Mutex::new(HashMap::new()),
        })
    }
}

fn pop(lists: &Mutex<FreeLists>, class: usize) -> Option<u64> {
    lists.lock().unwrap().get_mut(&class).and_then(|v| v.pop())
}

fn push(lists: &Mutex<FreeLists>, class: usize, ptr: u64) {
    lists.lock().unwrap().entry(class).or_default().push(ptr);
}

impl<A: RawAlloc> Drop for Block<A> {
    fn drop(&mut self) {
        match &self.reserve {
            Some(r) => push(&r.free, self.class, self.ptr),
            None => push(&self.pool.free, self.class, self.ptr),
        }
    }
}

impl<A: RawAlloc> Drop for Reserve<A> {
    fn drop(&mut self) {
        // Every block of the reserve is back in its lists (blocks hold the reserve alive).
        let blocks: Vec<(usize, Vec<u64>)> = self.free.lock().unwrap().drain().collect();
        for (class, ptrs) in blocks {
            for p in ptrs {
                push(&self.pool.free, class, p);
            }
        }
    }
}

impl<A: RawAlloc> Drop for Pool<A> {
    fn drop(&mut self) {
        self.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A device of `capacity` bytes that hands out increasing addresses and checks every free.
    struct Fake {
        capacity: usize,
        state: Mutex<(u64, usize, BTreeSet<u64>)>, // next address, bytes live, live blocks
        sizes: Mutex<HashMap<u64, usize>>,
    }

    impl Fake {
        fn new(capacity: usize) -> Fake {
            Fake {
                capacity,
                state: Mutex::new((4096, 0, BTreeSet::new())),
                sizes: Mutex::new(HashMap::new()),
            }
        }
    }

    impl RawAlloc for Arc<Fake> {
        fn malloc(&self, bytes: usize) -> Result<u64, String> {
            let mut s = self.state.lock().unwrap();
            if s.1 + bytes > self.capacity {
                return Err("CUDA_ERROR_OUT_OF_MEMORY".into());
            }
            let p = s.0;
            s.0 += bytes as u64;
            s.1 += bytes;
            s.2.insert(p);
            self.sizes.lock().unwrap().insert(p, bytes);
            Ok(p)
        }
        fn free(&self, ptr: u64) {
            let mut s = self.state.lock().unwrap();
            assert!(s.2.remove(&ptr), "double or foreign free of {ptr}");
            s.1 -= self.sizes.lock().unwrap()[&ptr];
        }
    }

    fn live(f: &Fake) -> usize {
        f.state.lock().unwrap().1
    }

    #[test]
    fn classes_cover_the_request_and_waste_at_most_a_quarter() {
        let mut last = 0;
        for b in (1..200_000)
            .step_by(7)
            .chain([1 << 20, (1 << 30) + 1, 3 << 29])
        {
            let c = size_class(b);
            assert!(c >= b && c >= 512, "{b} -> {c}");
            assert!(c >= last, "classes grow with the request");
            last = c;
            if b > 512 {
                assert!((c - b) as f64 <= 0.25 * b as f64, "{b} -> {c}");
            }
        }
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 5 << 18);
    }

    #[test]
    fn freed_blocks_are_reused_and_the_pool_frees_them_when_dropped() {
        let fake = Arc::new(Fake::new(1 << 20));
        let pool = Pool::new(fake.clone());
        let a = pool.take(1000, None).unwrap();
        let p = a.ptr;
        drop(a);
        assert_eq!(pool.cached(), size_class(1000));
        let b = pool.take(900, None).unwrap();
        assert_eq!(b.ptr, p, "same class: the cached block");
        assert_eq!(live(&fake), size_class(1000));
        drop(b);
        drop(pool);
        assert_eq!(live(&fake), 0, "a dropped pool returns its cache");
    }

    #[test]
    fn out_of_memory_is_retried_after_returning_the_cache() {
        let fake = Arc::new(Fake::new(64 << 10));
        let pool = Pool::new(fake.clone());
        // Fill the device with cached 8 KiB blocks.
        let blocks: Vec<_> = (0..8).map(|_| pool.take(8 << 10, None).unwrap()).collect();
        drop(blocks);
        assert_eq!(live(&fake), 64 << 10);
        // Another class fits only once the cache is gone.
        let big = pool.take(40 << 10, None).expect("retried after trim");
        assert_eq!(pool.cached(), 0);
        assert_eq!(pool.held(), 40 << 10);
        // Too big even then: an error naming the size and what is still held.
        let e = pool.take(32 << 10, None).err().unwrap();
        assert!(e.contains("32768 bytes") && e.contains("40960"), "{e}");
        drop(big);
    }

    #[test]
    fn a_reserve_keeps_its_blocks_from_other_allocations_until_dropped() {
        let fake = Arc::new(Fake::new(1 << 20));
        let pool = Pool::new(fake.clone());
        // A block cached before the capture moves into the reserve when the capture takes it.
        let before = pool.take(4096, None).unwrap().ptr;
        let reserve = pool.reserve();
        let scratch = pool.take(4096, Some(&reserve)).unwrap();
        assert_eq!(scratch.ptr, before);
        let scratch_ptr = scratch.ptr;
        // A temporary of the captured call is dropped during the capture...
        drop(scratch);
        // ...and an eager allocation of the same class must not receive the graph's address.
        let eager = pool.take(4096, None).unwrap();
        assert_ne!(eager.ptr, scratch_ptr);
        // The graph's own later allocations do reuse it.
        let again = pool.take(4096, Some(&reserve)).unwrap();
        assert_eq!(again.ptr, scratch_ptr);
        drop(again);
        // The graph is gone: its memory is shared again.
        drop(reserve);
        drop(eager);
        let (x, y) = (
            pool.take(4096, None).unwrap(),
            pool.take(4096, None).unwrap(),
        );
        assert!([x.ptr, y.ptr].contains(&scratch_ptr));
        assert_eq!(
            live(&fake),
            2 * 4096,
            "no new memory: both came from the lists"
        );
        drop((x, y));
        drop(pool);
        assert_eq!(live(&fake), 0);
    }

    /// Issue 23 defect: an allocation failing while a graph is captured must not trim (trimming
    /// synchronises the capturing stream, which invalidates the capture): a recoverable error.
    #[test]
    fn out_of_memory_while_capturing_does_not_trim() {
        struct Counting(Arc<Fake>, Arc<Mutex<usize>>);
        impl RawAlloc for Counting {
            fn malloc(&self, bytes: usize) -> Result<u64, String> {
                self.0.malloc(bytes)
            }
            fn free(&self, ptr: u64) {
                self.0.free(ptr)
            }
            fn sync(&self) {
                *self.1.lock().unwrap() += 1;
            }
        }
        let syncs = Arc::new(Mutex::new(0));
        let fake = Arc::new(Fake::new(64 << 10));
        let pool = Pool::new(Counting(fake.clone(), syncs.clone()));
        drop(pool.take(32 << 10, None).unwrap());
        let reserve = pool.reserve();
        let e = pool.take(48 << 10, Some(&reserve)).err().unwrap();
        assert!(e.contains("while capturing"), "{e}");
        assert_eq!(
            *syncs.lock().unwrap(),
            0,
            "no synchronisation while capturing"
        );
        assert_eq!(pool.cached(), 32 << 10, "the cache is kept");
        drop(reserve);
        // Eagerly the same request trims and succeeds.
        assert!(pool.take(48 << 10, None).is_ok());
        assert_eq!(*syncs.lock().unwrap(), 1);
    }
}
