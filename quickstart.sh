#!/bin/bash
# quickstart.sh: the README's quick start: install what is missing, build, then mount a demo volume, run the tests or the benchmark
set -euo pipefail

usage() {
	cat <<'EOF'
usage: ./quickstart.sh demo     install what is missing, build, create and mount ./demo/data on ./demo/mnt
       ./quickstart.sh test     install what is missing, build, run the whole test suite
       ./quickstart.sh bench [bench/run options]
                                install what is missing, build, run the benchmark (bench/README.md)
EOF
}

BUILD_PKGS=(build-essential meson ninja-build pkg-config libfuse3-dev fuse3 libsodium-dev
	libcurl4-openssl-dev libcjson-dev libssl-dev)
TEST_PKGS=(python3-pytest attr rsync sqlite3 git openssl systemd man-db groff-base gdb fio)
BENCH_PKGS=(gocryptfs securefs fio)

cd "$(dirname "$(readlink -f "$0")")"
LOG=$(mktemp -t keyfs-quickstart.XXXXXX)
trap 'rm -f "$LOG"' EXIT

say() { printf 'quickstart: %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }

# Run a noisy step with its output in $LOG; show that output only when it fails.
quiet() {
	local what=$1; shift
	local rc=0
	"$@" >"$LOG" 2>&1 </dev/null || rc=$?
	if ((rc != 0)); then
		cat "$LOG" >&2
		die "$what failed (exit $rc): $*"
	fi
}

install_missing() {
	local missing=() p
	for p in "$@"; do
		if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
			missing+=("$p")
		fi
	done
	((${#missing[@]})) || return 0
	local sudo=()
	if ((EUID != 0)); then
		command -v sudo >/dev/null ||
			die "not root and no sudo: as root, run: apt-get install ${missing[*]}"
		sudo=(sudo)
	fi
	say "installing ${missing[*]}"
	quiet "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
	quiet "apt-get install" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends "${missing[@]}"
}

build() {
	if [[ ! -f build/build.ninja ]]; then
		quiet "meson setup" meson setup build
	fi
	quiet "build" meson compile -C build
	[[ -x build/fs/keyfs && -x build/cli/keyfsctl ]] ||
		die "build finished but build/fs/keyfs or build/cli/keyfsctl is missing"
	say "built build/fs/keyfs and build/cli/keyfsctl"
}

demo() {
	install_missing "${BUILD_PKGS[@]}"
	build
	local ctl=build/cli/keyfsctl data=demo/data mnt=demo/mnt
	local abs fstype
	abs="$(pwd -P)/$mnt"
	fstype=$(findmnt -rn -o FSTYPE --mountpoint "$abs" || true)
	if [[ -n $fstype ]] && ! stat "$mnt" >/dev/null 2>&1; then
		die "$mnt is a dead mount (its daemon is gone): run 'fusermount3 -u $mnt' and try again"
	fi
	mkdir -p demo "$mnt"

	if [[ -f $data/.keyfs ]]; then
		say "reusing the volume $data"
	elif "$ctl" key show demo >/dev/null 2>&1; then
		quiet "keyfsctl init" "$ctl" init "$data" --kms local --key demo
		say "created the volume $data with the existing local key 'demo'"
	else
		quiet "keyfsctl init" "$ctl" init "$data" --kms local --key demo --create-key
		say "created the local key 'demo' and the volume $data"
	fi

	if [[ $fstype == fuse.keyfs ]]; then
		say "$mnt is already mounted"
	elif [[ -n $fstype ]]; then
		die "$mnt is already mounted by something else ($fstype)"
	else
		build/fs/keyfs "$data" "$mnt" </dev/null ||
			die "mounting $data on $mnt failed (exit $?)"
		local i
		for ((i = 0; i < 50; i++)); do
			[[ $(findmnt -rn -o FSTYPE --mountpoint "$abs" || true) == fuse.keyfs ]] && break
			sleep 0.1
		done
		((i < 50)) || die "keyfs started but $mnt did not appear as a mount"
		say "mounted $data on $mnt"
	fi

	cat <<EOF

Next steps:
  echo 'hello, keyfs' > $mnt/hello.txt    # use $mnt like any local directory
  cat $mnt/hello.txt
  $ctl inspect $mnt/hello.txt   # its header: key, sizes (add --json)
  strings $data/hello.txt                 # the backing file: header in clear, contents encrypted
  fusermount3 -u $mnt                     # unmount; ./quickstart.sh demo mounts it again
EOF
}

run_tests() {
	install_missing "${BUILD_PKGS[@]}" "${TEST_PKGS[@]}"
	# A build dir configured by 'demo' before the test packages were there has no pytest suite:
	# configure again so the whole suite is defined.
	if [[ -f build/build.ninja ]]; then
		quiet "meson setup --reconfigure" meson setup --reconfigure build
	fi
	build
	meson test -C build --print-errorlogs </dev/null
}

bench() {
	install_missing "${BUILD_PKGS[@]}" "${BENCH_PKGS[@]}"
	build
	bench/run "$@" </dev/null
}

case ${1-} in
demo) shift; (($# == 0)) || { usage >&2; exit 2; }; demo ;;
test) shift; (($# == 0)) || { usage >&2; exit 2; }; run_tests ;;
bench) shift; bench "$@" ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
