#!/usr/bin/env bash
# Run a long benchmark chain on a machine reached through calls with a time limit: `start`
# launches a named job in the background (it survives between calls while the machine stays
# up); `wait` waits up to N seconds and copies the small results under /tmp/res to $OUT.
# Usage: bash benchmarks/background_job.sh start NAME CMD...   |   bash benchmarks/background_job.sh wait NAME SECONDS
set -u
mode=$1; name=$2; shift 2
d=/tmp/jobs/$name; mkdir -p "$d"
if [ "$mode" = start ]; then
  rm -f "$d/rc"  # a finished job's status must not answer for this one
  ( setsid bash -c "$*; echo \$? > $d/rc" > "$d/log" 2>&1 & echo $! > "$d/pid" )
  echo "started $name pid $(cat $d/pid)"
  exit 0
fi
secs=$1
for _ in $(seq 1 "$secs"); do [ -f "$d/rc" ] && break; sleep 1; done
echo "== $name rc=$(cat $d/rc 2>/dev/null || echo running)"
tail -40 "$d/log"
cp "$d/log" "$OUT/$name.log" 2>/dev/null
(cd /tmp && find res -type f \( -name '*.json' -o -name '*.txt' -o -name '*.log' -o -name '*.yaml' \) -size -5M | tar czf "$OUT/res.tgz" -T -)
ls -la "$OUT"
