//! Criterion benchmarks for Parley live in `benches/` beside this file: `cargo bench -p
//! parley-benches`. BENCHMARKS.md at the workspace root has the figures and how to run the
//! relay harness. This library is empty on purpose.
