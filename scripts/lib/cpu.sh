# Sourced by the bench scripts: CPU time of processes and the broker's process id.

# Nanoseconds the threads of the given processes have run (the first field of each thread's
# schedstat): finer than utime+stime of /proc/<pid>/stat (10 ms ticks), and the broker's
# threads live on.
cpu_ns() {
  for pid in "$@"; do cat /proc/"$pid"/task/*/schedstat 2>/dev/null; done | awk '{ s += $1 } END { printf "%d", s }'
}

# The main RabbitMQ node's beam.smp: asked of the node, else found by its name.
broker_pid() {
  local pid
  pid=$(rabbitmqctl -q eval 'os:getpid().' 2>/dev/null | tr -d '"' || true)
  if [ -z "$pid" ] || [ ! -r "/proc/$pid/stat" ]; then
    pid=$(pgrep -f "beam.smp.*rabbit@$(hostname -s)" | head -1 || true)
  fi
  [ -n "$pid" ] || pid=$(pgrep -o beam.smp)
  echo "$pid"
}
