//! Replays every committed fuzz input through its target on the stable
//! toolchain, so a crash a fuzzer once found stays fixed: the seed corpora
//! (`fuzz/corpus/<target>/`) and the regressions (`fuzz/regressions/<target>/`,
//! one file per crash found). Then mutates the seeds with a fixed-seed
//! generator for a few thousand more inputs per target, a bounded property
//! test where no fuzzer runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed`: flip, insert, delete, duplicate or splice bytes,
/// or set an interesting integer.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, rng.next() as u8);
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below(8.min(out.len() - i));
                out.drain(i..i + n);
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below(16.min(out.len() - i));
                let chunk: Vec<u8> = out[i..i + n].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, chunk);
            }
            4 if out.len() >= 4 => {
                let i = rng.below(out.len() - 3);
                let v: u32 = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u32::MAX][rng.below(8)];
                out[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => out.truncate(rng.below(out.len() + 1)),
        }
    }
    out
}

#[test]
fn every_committed_input_and_its_mutations_pass_their_target() {
    let fuzz = fuzz_dir();
    let mut replayed = 0;
    for (name, target) in waymark_fuzz::TARGETS {
        let seeds = inputs(&fuzz.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seed inputs");
        for (path, bytes) in seeds
            .iter()
            .chain(&inputs(&fuzz.join("regressions").join(name)))
        {
            let result = std::panic::catch_unwind(|| target(bytes));
            assert!(result.is_ok(), "{name}: {} fails", path.display());
            replayed += 1;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        for i in 0..3000 {
            let seed = &seeds[i % seeds.len()].1;
            let input = mutate(&mut rng, seed);
            let result = std::panic::catch_unwind(|| target(&input));
            assert!(
                result.is_ok(),
                "{name}: mutation {i} of {} fails on {:02x?}",
                seeds[i % seeds.len()].0.display(),
                input
            );
        }
    }
    assert!(replayed > 0);
}
