# Shared by scripts/bench.sh and scripts/bench-compare.sh (sourced, not run).

# Percent of CPU time idle over one second, from /proc/stat.
idle_percent() {
  local a b
  read -r -a a < <(grep '^cpu ' /proc/stat)
  sleep 1
  read -r -a b < <(grep '^cpu ' /proc/stat)
  local total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  echo $(( (b[4] - a[4]) * 100 / (total > 0 ? total : 1) ))
}

# Waits (at most a minute) until the machine is quiet: the broker keeps working for a while
# after a large run (queue deletion, log compaction), and would slow the next figure.
settle() {
  local idle
  for _ in $(seq 60); do
    idle=$(idle_percent)
    [ "$idle" -ge 90 ] && break
  done
  echo "# idle before the next figure: ${idle}%"
}
