# Sourced by the load scripts: stop_started stops what a script started (PIDs in its array
# pids), newest first, each gone before the next: the proxies before the controller they
# subscribe to, which otherwise each log that they lost it.
stop_started() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
