# Sourced by bin/flock-up, bin/flock-down and bin/flockserve of the air-gapped bundle
# (scripts/bundle/build.py copies it into flock-bundle/bin/). Sets the environment that points
# scripts/services and flockserve at the bundle's own java, Kafka jars, PostgreSQL and wheels.
#
# Knobs (all optional): FLOCK_STATE_DIR (default <bundle>/state), FLOCK_PYTHON (default python3),
# FLOCK_KAFKA_PORT / FLOCK_KAFKA_CONTROLLER_PORT / FLOCK_PG_PORT (defaults 19092/19093/15432),
# FLOCK_BUNDLE_WHEELS (a wheel dir used instead of <bundle>/wheels), every other FLOCK_* setting.

bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
case "$bundle" in *[[:space:]]*) echo "[bundle] error: the bundle path must not contain spaces: $bundle" >&2; exit 1 ;; esac
export FLOCK_STATE_DIR
FLOCK_STATE_DIR=$(realpath -m -- "${FLOCK_STATE_DIR:-$bundle/state}")
state=$FLOCK_STATE_DIR
py=${FLOCK_PYTHON:-python3}
pylayer=$state/python
# useradd/runuser live in sbin, which a minimal PATH (env -i, some container shells) lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac
bsay() { printf '[bundle] %s\n' "$*" >&2; }
bdie() { printf '[bundle] error: %s\n' "$*" >&2; exit 1; }

export FLOCK_JAVA=$bundle/java/bin/java
export FLOCK_KAFKA_LIBS=$bundle/kafka/libs
# The bundle's broker logs through slf4j-simple (no reload4j): same file and levels as log4j would.
export FLOCK_KAFKA_JVM_OPTS="-Dorg.slf4j.simpleLogger.logFile=$state/logs/kafka.log -Dorg.slf4j.simpleLogger.showDateTime=true -Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS -Dorg.slf4j.simpleLogger.defaultLogLevel=info -Dorg.slf4j.simpleLogger.log.org.apache.kafka=warn -Dorg.slf4j.simpleLogger.log.org.apache.kafka.common.utils.AppInfoParser=info ${FLOCK_KAFKA_JVM_OPTS:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export FLOCK_STORE_DIR=${FLOCK_STORE_DIR:-$state/blobs}
export FLOCK_MODELS_DIR=${FLOCK_MODELS_DIR:-$state/models}
export PYTHONPATH=$pylayer${PYTHONPATH:+:$PYTHONPATH}
eval "$("$bundle/scripts/services" env)"  # FLOCK_KAFKA_BOOTSTRAP, FLOCK_DATABASE_URL from the ports

# PostgreSQL runs as the `postgres` account when we are root; it must be able to execute the
# bundle's binaries. A bundle unpacked under a 0700 directory (/root, mktemp -d) is not, so the
# pg/ tree is copied once to /var/lib/flock/pg-runtime-<hash> (0755) and used from there.
pg_runtime() {
  local pg=$bundle/pg
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    if ! (cd / && runuser -u postgres -- test -x "$pg/bin/postgres") 2>/dev/null; then
      local key; key=$(printf '%s' "$bundle" | sha256sum | cut -c1-12)
      local dst=/var/lib/flock/pg-runtime-$key
      if [ ! -f "$dst/.complete" ] || ! cmp -s "$pg/bin/postgres" "$dst/bin/postgres"; then
        bsay "the postgres account cannot enter $bundle; copying the PostgreSQL binaries to $dst"
        mkdir -p -m 755 /var/lib/flock; rm -rf "$dst"; cp -a "$pg" "$dst"; chmod -R go+rX "$dst"
        touch "$dst/.complete"
      fi
      pg=$dst
    fi
  fi
  export FLOCK_PG_BIN=$pg/bin
}

flockserve() { "$py" -m workers.cli "$@"; }
