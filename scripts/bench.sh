#!/usr/bin/env bash
# Sweeps the training benchmark over context lengths and appends the table, with
# the device and date, to docs/benchmarks.md (OUT_MD to write elsewhere).
#   scripts/bench.sh                                   # 7B shape, 8k..256k, on the GPU
#   SHAPE=configs/shapes/tiny-cpu.json LENS="256 512" DEVICE=cpu scripts/bench.sh
# Extra run-config overrides: SETS="--set attention.backend=kernel".
# A length that fails (out of memory, say) gets its error in the table and the
# sweep goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-build/longlora-train}"
SHAPE="${SHAPE:-configs/shapes/llama2-7b.json}"
LENS="${LENS:-8192 32768 65536 131072 262144}"
STEPS="${STEPS:-3}"
WARMUP="${WARMUP:-1}"
DEVICE="${DEVICE:-auto}"
SETS="${SETS:-}"
OUT_MD="${OUT_MD:-docs/benchmarks.md}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for L in $LENS; do
  echo "== seq_len $L" >&2
  # shellcheck disable=SC2086  # SETS holds several words on purpose
  if ! "$BIN" bench --shape "$SHAPE" --seq-len "$L" --steps "$STEPS" --warmup "$WARMUP" \
      --device "$DEVICE" --json $SETS >"$tmp/$L.json" 2>"$tmp/$L.err"; then
    msg="$(grep -v '^\[' "$tmp/$L.err" | tail -1 | cut -c1-120)"
    [ -n "$msg" ] || msg="$(tail -1 "$tmp/$L.err" | cut -c1-120)"
    printf '{"seq_len": %s, "error": "%s"}\n' "$L" "${msg//\"/\'}" >"$tmp/$L.json"
  fi
  tail -1 "$tmp/$L.json" >&2
done

python3 - "$tmp" "$SHAPE" "$SETS" "$LENS" >>"$OUT_MD" <<'PY'
import datetime, json, sys
tmp, shape, sets, lens = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
rows = []
for L in lens:
    try:
        rows.append(json.loads(open(f"{tmp}/{L}.json").read().strip().splitlines()[-1]))
    except Exception as e:  # a run that printed nothing parseable
        rows.append({"seq_len": int(L), "error": str(e)})
dev = next((r["device"] for r in rows if "device" in r), "unknown device")
print(f"\n### `scripts/bench.sh`: {shape} on {dev}, {datetime.date.today()} {sets}\n")
print("| context | attention | tokens/s | step s | MFU | peak GiB (allocated) |")
print("|---|---|---|---|---|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['seq_len']} | | failed: {r['error']} | | | |")
        continue
    mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
    print(f"| {r['seq_len']} | {r['attention_backend']} | {r['tokens_per_s']:.0f} | "
          f"{r['step_ms'] / 1000:.2f} | {mfu} | {r['peak_mem_gib']:.1f} ({r['peak_allocated_gib']:.1f}) |")
PY
echo "appended to $OUT_MD" >&2
