"""The small core every sfmed stage may use and that uses no stage: errors, CLI exit path,
logging, dtypes, distributed set-up, the Megatron checkpoint layout and I/O, atomic outputs,
CPU emulation. Importing ``sfmed.core`` itself imports nothing heavy (no torch)."""
