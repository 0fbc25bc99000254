/* main.c: the keyfs daemon: startup checks in order, each with its exit code, then mount, serve, unmount */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs-config.h"
#include "keyfs/audit.h"
#include "keyfs/exitcode.h"
#include "keyfs/log.h"
#include "keyfs/secmem.h"
#include "keyfs/util.h"
#include "keyfs/volume.h"

#include "ctlsock.h"
#include "dekpool.h"
#include "keystate.h"
#include "lockdown.h"
#include "loop.h"
#include "notify.h"
#include "fs.h"
#include "options.h"
#include "keycache.h"
#include "prefetch.h"

/* Key Protect defaults of -o dek_pool= and -o prefetch= (the local keystore: 0 and 0). The pool
 * may hold twice the calls in flight: its refills fill the window while keys are still ready. */
#define DEFAULT_DEK_POOL (2 * KMS_CONCURRENCY_DEFAULT)
#define DEFAULT_PREFETCH 256

static bool dir_is_empty(const char *path, int *ret_err)
{
	struct dirent *de;
	bool empty = true;
	DIR *d = opendir(path);

	if (!d) {
		*ret_err = errno;
		return false;
	}
	while ((de = readdir(d))) {
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
			empty = false;
			break;
		}
	}
	closedir(d);
	*ret_err = 0;
	return empty;
}

/* Detach the dead mount at path, as 'fusermount3 -uz' would. Returns 0 or -errno. */
static int detach(const char *path)
{
	char *argv[] = { "fusermount3", "-u", "-z", "--", (char *)path, NULL };
	int status, r;
	pid_t pid;

	if (geteuid() == 0)
		return umount2(path, MNT_DETACH) < 0 ? -errno : 0;
	r = posix_spawnp(&pid, "fusermount3", NULL, NULL, argv, environ);
	if (r != 0)
		return -r;
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return -EPERM;
	return 0;
}

/*
 * What is mounted at fs->mountpoint already. A live keyfs there is refused: a second daemon
 * would take over its control socket. A keyfs of this very backing dir whose daemon died (a
 * crash, SIGKILL) leaves a dead mount, on which a restart (systemd's Restart=on-failure) would
 * fail for ever: nobody serves it and nothing can be lost by removing it, so it is detached,
 * as an admin would. Any other dead mount is left to the admin. Returns 0 or an exit code.
 */
static int check_mounted(struct keyfs *fs, const char *arg)
{
	char fstype[64], source[PATH_MAX];
	struct statfs sfs;
	int r;

	if (util_mount_at(fs->mountpoint, fstype, sizeof(fstype), source, sizeof(source), NULL, 0) < 0)
		return 0;
	/* statfs always reaches the daemon; a cached stat may not. */
	r = statfs(fs->mountpoint, &sfs) < 0 ? errno : 0;
	if (r != ENOTCONN) {
		if (strcmp(fstype, KEYFS_FSTYPE) != 0)
			return 0;
		log_err("mountpoint '%s' is already a keyfs mount (of '%s')", arg, source);
		return KEYFS_EXIT_MOUNT;
	}
	if (strcmp(fstype, KEYFS_FSTYPE) != 0 || strcmp(source, fs->backing) != 0) {
		log_err("mountpoint '%s' is a dead FUSE mount (%s, of '%s'): unmount it with 'fusermount3 -uz %s'",
			arg, fstype, source, fs->mountpoint);
		return KEYFS_EXIT_MOUNT;
	}
	r = detach(fs->mountpoint);
	if (r < 0) {
		log_err("mountpoint '%s' holds a dead keyfs mount of '%s' and it cannot be removed: %s; run 'fusermount3 -uz %s'",
			arg, fs->backing, strerror(-r), fs->mountpoint);
		return KEYFS_EXIT_MOUNT;
	}
	log_warn("mountpoint '%s' held a dead keyfs mount of '%s' (its daemon died): removed it", arg, fs->backing);
	return 0;
}

static int check_mountpoint(struct keyfs *fs, const struct keyfs_options *o)
{
	size_t blen = strlen(fs->backing);
	struct stat st;
	int err, code;

	/* A dead mount answers nothing: its path comes from its parent's. */
	if (!realpath(o->mountpoint, fs->mountpoint) &&
	    (errno != ENOTCONN || util_parent_real_path(o->mountpoint, fs->mountpoint, sizeof(fs->mountpoint)) < 0)) {
		log_err("mountpoint '%s': %s", o->mountpoint, strerror(errno));
		return KEYFS_EXIT_MOUNT;
	}
	code = check_mounted(fs, o->mountpoint);
	if (code)
		return code;
	if (stat(fs->mountpoint, &st) < 0) {
		log_err("mountpoint '%s': %s", o->mountpoint, strerror(errno));
		return KEYFS_EXIT_MOUNT;
	}
	if (!S_ISDIR(st.st_mode)) {
		log_err("mountpoint '%s' is not a directory", o->mountpoint);
		return KEYFS_EXIT_MOUNT;
	}
	/* Mounting over the backing dir, or inside it, would make the volume serve itself. */
	if (strcmp(fs->backing, "/") == 0 ||
	    (strncmp(fs->mountpoint, fs->backing, blen) == 0 &&
	     (fs->mountpoint[blen] == '\0' || fs->mountpoint[blen] == '/'))) {
		log_err("mountpoint '%s' is inside the backing dir '%s'", o->mountpoint, fs->backing);
		return KEYFS_EXIT_MOUNT;
	}
	if (!o->nonempty && !dir_is_empty(fs->mountpoint, &err)) {
		if (err)
			log_err("mountpoint '%s': %s", o->mountpoint, strerror(err));
		else
			log_err("mountpoint '%s' is not empty", o->mountpoint);
		return KEYFS_EXIT_MOUNT;
	}
	return 0;
}

/* The key service the host trusts (the volume layer checked the description against it). */
static int open_kms(struct keyfs *fs, struct vol *v)
{
	int code, state;

	code = vol_kms_open(v, NULL);
	if (code)
		return code;
	fs->kms = v->kms;
	v->kms = NULL;
	state = v->key_state;
	fs->initial_key_state = state;
	switch (state) {
	case KMS_STATE_ACTIVE:
		return 0;
	case KMS_STATE_DEACTIVATED:
		log_warn("key '%s' is deactivated: files can be read and written, not created", fs->vol.key);
		return 0;
	case KMS_STATE_SUSPENDED:
	case KMS_STATE_DESTROYED:
	case KMS_STATE_PURGED:
		/* Mount anyway, locked: what a shredded volume held stays visible to admins, and the
		 * mount unlocks by itself when the key is enabled or restored. */
		log_warn("key '%s' is %s: mounting locked: names, sizes and times are visible, contents are not",
			 fs->vol.key, kms_state_name(state));
		fs->initial_key_state = state;
		return 0;
	default:
		log_err("key '%s' is %s: it cannot protect a volume", fs->vol.key, kms_state_name(state));
		return KEYFS_EXIT_KMS;
	}
}

/* Is the mount read-only? Then no file is ever created: a pool would wrap keys for nothing. */
static bool mount_ro(const struct keyfs_options *o)
{
	bool ro = false;
	const char *p = o->fuse;

	while (*p) {
		size_t n = strcspn(p, ",");

		if (n == 2 && strncmp(p, "ro", 2) == 0)
			ro = true;
		else if (n == 2 && strncmp(p, "rw", 2) == 0)
			ro = false;
		p += n;
		if (*p == ',')
			p++;
	}
	return ro;
}

/*
 * What saves KMS round trips: keys for new files wrapped ahead (a pool), and keys of listed
 * files unwrapped ahead (prefetch). Both pay off against a remote service; with the local
 * keystore a wrap is a local computation, so they default to off there.
 */
static int start_ahead(struct keyfs *fs, const struct keyfs_options *o)
{
	bool remote = strcmp(fs->vol.kms, VOLDESC_KMS_LOCAL) != 0;
	int pool = o->dek_pool >= 0 ? o->dek_pool : remote ? DEFAULT_DEK_POOL : 0;
	int ahead = o->prefetch >= 0 ? o->prefetch : remote ? DEFAULT_PREFETCH : 0;
	unsigned inflight = o->kms_concurrency > 0 ? (unsigned)o->kms_concurrency : KMS_CONCURRENCY_DEFAULT;
	int r;

	if (mount_ro(o))
		pool = 0;
	/* The pool's and the prefetcher's threads share the client's window of calls in flight. */
	kms_set_concurrency(fs->kms, inflight);
	r = dekpool_new(fs->kms, fs->vol.volume, &fs->slab, (unsigned)pool, inflight, &fs->pool);
	if (r < 0) {
		log_err("dek pool: %s", strerror(-r));
		return KEYFS_EXIT_FAILURE;
	}
	fs->prefetch_max = (unsigned)ahead;
	if (ahead > 0) {
		r = prefetch_new(fs, inflight, &fs->prefetch);
		if (r < 0) {
			log_err("prefetch: %s", strerror(-r));
			return KEYFS_EXIT_FAILURE;
		}
		/* What the prefetch unwraps for a file the kernel forgets before its open is kept
		 * (keycache.h), for as many files as may wait in its queue. */
		r = keycache_new(&fs->slab, fs->ks, PREFETCH_QUEUE, &fs->table.keycache);
		if (r < 0) {
			log_err("key cache: %s", strerror(-r));
			return KEYFS_EXIT_FAILURE;
		}
	}
	if (pool > 0 || ahead > 0)
		log_debug("keys ahead: a pool of up to %d for new files, up to %d per directory listing, %u calls in flight",
			  pool, ahead, inflight);
	return 0;
}

/*
 * Every inode the kernel remembers holds one O_PATH fd here, and the kernel forgets inodes only
 * under memory pressure: a default limit of 1024 (or 20000) files runs out on the first large
 * tree. Raise the limit to the kernel's maximum when allowed, else to our hard limit.
 */
static void raise_nofile_limit(void)
{
	struct rlimit rl;
	uint64_t nr_open = 1u << 20;
	char *text = NULL;
	size_t len;

	if (util_read_file(AT_FDCWD, "/proc/sys/fs/nr_open", 32, &text, &len) == 0) {
		while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == ' '))
			text[--len] = '\0';
		if (util_parse_u64(text, 1024, UINT32_MAX, &nr_open) < 0)
			nr_open = 1u << 20;
		free(text);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < nr_open) {
		struct rlimit up = { (rlim_t)nr_open, (rlim_t)nr_open };

		if (setrlimit(RLIMIT_NOFILE, &up) == 0)
			return;
	}
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/*
 * Go to the background before the key service is opened, not after the mount as
 * fuse_daemonize() would: threads a KMS backend starts and the mlock of sodium_malloc memory
 * do not survive a fork. The parent stays until the child reports, so the exit code and the
 * message still reach whoever started us. Returns the report fd (child only).
 */
static int daemon_fork(void)
{
	int p[2], status;
	unsigned char code;
	ssize_t n;
	pid_t pid;

	if (pipe2(p, O_CLOEXEC) < 0) {
		log_err("cannot go to the background: %s", strerror(errno));
		exit(KEYFS_EXIT_FAILURE);
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0) {
		log_err("cannot go to the background: %s", strerror(errno));
		exit(KEYFS_EXIT_FAILURE);
	}
	if (pid > 0) {
		close(p[1]);
		do
			n = read(p[0], &code, 1);
		while (n < 0 && errno == EINTR);
		if (n == 1)
			_exit(code);
		/* The child died without a word. */
		if (waitpid(pid, &status, 0) == pid && WIFEXITED(status))
			_exit(WEXITSTATUS(status));
		_exit(KEYFS_EXIT_FAILURE);
	}
	close(p[0]);
	setsid();
	return p[1];
}

static void daemon_report(int *fd, int code)
{
	unsigned char c = (unsigned char)code;

	if (*fd < 0)
		return;
	if (write(*fd, &c, 1) < 0) {
		/* The parent is gone; nobody is left to tell. */
	}
	close(*fd);
	*fd = -1;
}

static void daemon_detach(void)
{
	int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

	if (chdir("/") < 0) {
		/* Relative paths are resolved already; staying put is harmless. */
	}
	if (fd >= 0) {
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
	}
	log_to_syslog(true);
	audit_to_syslog(true);
}

/* fsname=<backing>: commas and backslashes escaped for libfuse's option parser. */
static int fuse_optstr(const struct keyfs *fs, const struct keyfs_options *o, char *buf, size_t size)
{
	size_t n = 0;
	int w;

	w = snprintf(buf, size, "fsname=");
	n = (size_t)w;
	for (const char *c = fs->backing; *c; c++) {
		if (n + 3 > size)
			return -ENAMETOOLONG;
		if (*c == ',' || *c == '\\')
			buf[n++] = '\\';
		buf[n++] = *c;
	}
	/* The daemon runs with the mounter's rights (root under systemd) and checks no permissions
	 * itself, so the kernel must always check them: without this, allow_other would let any
	 * user read and delete every file. */
	w = snprintf(buf + n, size - n, ",subtype=" KEYFS_FSSUBTYPE ",default_permissions%s%s", o->fuse[0] ? "," : "", o->fuse);
	if (w < 0 || (size_t)w >= size - n)
		return -ENAMETOOLONG;
	return 0;
}

static int serve(struct keyfs *fs, const struct keyfs_options *o, int *report_fd)
{
	char optstr[2 * PATH_MAX + OPTIONS_FUSE_MAX + 64];
	char arg0[] = "keyfs", arg_o[] = "-o", arg_d[] = "-d";
	char *argv[] = { arg0, arg_o, optstr, o->debug ? arg_d : NULL, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(o->debug ? 4 : 3, argv);
	struct fuse_session *se;
	int r, code = KEYFS_EXIT_OK;

	if (fuse_optstr(fs, o, optstr, sizeof(optstr)) < 0) {
		log_err("backing dir '%s': path too long for a mount source", fs->backing);
		return KEYFS_EXIT_CONFIG;
	}
	se = fuse_session_new(&args, &keyfs_ops, sizeof(keyfs_ops), fs);
	fuse_opt_free_args(&args);      /* libfuse may have copied our argv */
	if (!se) {
		/* libfuse printed why: in practice a combination of mount options it refuses. */
		log_err("mount options '%s' refused by libfuse", optstr);
		return KEYFS_EXIT_USAGE;
	}
	fs->se = se;
	if (fuse_set_signal_handlers(se) != 0) {
		log_err("cannot install signal handlers");
		fuse_session_destroy(se);
		return KEYFS_EXIT_FAILURE;
	}
	if (fuse_session_mount(se, fs->mountpoint) != 0) {
		log_err("mountpoint '%s': mount failed", o->mountpoint);
		fuse_remove_signal_handlers(se);
		fuse_session_destroy(se);
		return KEYFS_EXIT_MOUNT;
	}
	if (!o->foreground) {
		daemon_report(report_fd, KEYFS_EXIT_OK);
		daemon_detach();
	}
	log_info("'%s' mounted on '%s' (volume %s, format %d, %s, key '%s'%s%s)", fs->backing, fs->mountpoint,
		 fs->vol.volume, fs->vol.format, fmt_cipher_name(voldesc_cipher(&fs->vol)), fs->vol.key,
		 fs->shared ? ", shared" : "", keystate_locked(fs->ks) ? ", locked" : "");
	/* Audit events leave from a thread of their own: never a FUSE request thread's wait. */
	if (audit_start() < 0)
		log_warn("audit: no thread of its own: events are sent inline");
	r = keystate_start(fs->ks);
	if (r < 0)
		log_err("key state poller: %s: the key is not watched", strerror(-r));
	control_start(fs, fs->ks, &fs->control);
	notify_send("READY=1\nSTATUS=%s: key %s", keystate_locked(fs->ks) ? "locked" : "unlocked", fs->vol.key);

	/* Our loop, not fuse_session_loop_mt: its receive buffers are wiped after each request. */
	r = loop_run(se, &(struct loop_config){ .max_threads = 10, .max_idle = 10 });
	if (r < 0) {
		log_err("fuse session: %s", strerror(-r));
		code = KEYFS_EXIT_FAILURE;
	}
	notify_send("STOPPING=1");
	/* Unmount first: a lock under way then finds no kernel to wait for, and ends. */
	fuse_session_unmount(se);
	/* Nobody needs a key any more: calls to the key service under way end now instead of
	 * waiting out its timeout, and the threads making them can be joined at once. */
	kms_cancel(fs->kms);
	control_stop(fs->control);
	fs->control = NULL;
	/* Its lock thread needs the session, so it stops now; the state itself stays until the
	 * prefetch, pool and key cache threads, which check it, are joined (main). */
	keystate_stop(fs->ks);
	audit_stop();
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	fs->se = NULL;
	log_info("'%s' unmounted", fs->mountpoint);
	return code;
}

/* Keys, tokens and plaintext never reach swap where the limits let every page stay locked. */
static void lock_memory(void)
{
	struct rlimit rl;
	int r = secmem_lock_all();

	if (r > 0)
		return;
	if (r < 0) {
		log_warn("memory not locked: %s: secrets may reach swap", strerror(-r));
		return;
	}
	getrlimit(RLIMIT_MEMLOCK, &rl);
	log_info("memory not locked (RLIMIT_MEMLOCK is %llu KiB, not infinity): secrets may reach swap; run with LimitMEMLOCK=infinity (keyfs@.service does) or ulimit -l unlimited, or encrypt swap",
		 (unsigned long long)rl.rlim_cur / 1024);
}

static int run(struct keyfs *fs, const struct keyfs_options *o)
{
	const struct vol_host host = {
		.keystore = o->keystore, .ca_file = o->ca_file, .apikey_file = o->apikey_file,
		.kms = o->kms, .key = o->key, .endpoint = o->endpoint, .instance = o->instance,
		.iam_endpoint = o->iam_endpoint,
	};
	struct stat root_st;
	struct vol v;
	int root_fd = -1, report_fd = -1, code, r;

	/* The description, checked against the host's trust before anything else is read. */
	code = vol_open(o->backing, &host, VOL_DAEMON, &v);
	/* Shared when the volume says so, unless the mount says otherwise (docs/LOCKING.md). */
	fs->shared = o->shared >= 0 ? o->shared == 1 : strcmp(v.vol.shared, "1") == 0;
	if (code == 0)
		code = vol_lock(&v, fs->shared);
	if (code) {
		vol_close(&v);
		return code;
	}
	/* Every file's cipher is in its header, but a volume whose new files this process could not
	 * seal is refused whole, not file by file. */
	if (!fmt_cipher_available(voldesc_cipher(&v.vol))) {
		log_err("volume '%s': its files use %s, which this host's libcrypto cannot give (no AES-256-GCM)",
			v.backing, fmt_cipher_name(voldesc_cipher(&v.vol)));
		vol_close(&v);
		return KEYFS_EXIT_CONFIG;
	}
	memcpy(fs->backing, v.backing, sizeof(fs->backing));
	fs->vol = v.vol;
	fs->volume_lock_fd = v.lock_fd;
	v.lock_fd = -1;
	root_fd = v.root_fd;
	v.root_fd = -1;
	root_st = v.root_st;
	code = check_mountpoint(fs, o);
	if (code) {
		close(root_fd);
		return code;
	}
	/* Files are reopened and xattrs reached through /proc/self/fd: no path strings, no races. */
	if (access("/proc/self/fd", X_OK) < 0) {
		log_err("'/proc/self/fd': %s: keyfs needs /proc mounted", strerror(errno));
		close(root_fd);
		return KEYFS_EXIT_FAILURE;
	}
	keyslab_init(&fs->slab);
	r = inode_table_init(&fs->table, root_fd, &root_st, &fs->slab);
	if (r < 0) {
		log_err("inode table: %s", strerror(-r));
		close(root_fd);
		keyslab_destroy(&fs->slab);
		return KEYFS_EXIT_FAILURE;
	}
	/* One mount per volume: nothing but keyfs changes what it serves (docs/man/keyfs.8). A
	 * shared volume changes under us: the timeout bounds how late we show it. */
	fs->timeout = fs->shared ? (double)o->shared_timeout : 86400.0;
	fs->as_root = geteuid() == 0;
	raise_nofile_limit();
	fs->debug = o->debug;
	/* Shared: the kernel must not own sizes or hold writes another host should see. */
	fs->writeback = o->writeback && !fs->shared;
	if (o->writeback && fs->shared)
		log_info("shared volume: the writeback cache stays off");

	if (!o->foreground) {
		report_fd = daemon_fork();
		vol_lock_owner(fs->volume_lock_fd);     /* the lock is the child's now */
	}
	lock_memory();                  /* after the fork: memory locks are not inherited */
	code = open_kms(fs, &v);
	if (code == 0 && lockdown_keystate_new(fs, (unsigned)o->poll, (unsigned)o->grace, fs->initial_key_state, &fs->ks) < 0)
		code = KEYFS_EXIT_FAILURE;
	if (code == 0)
		code = start_ahead(fs, o);
	/* A mount that starts locked makes no keys ahead until it unlocks. */
	if (code == 0 && keystate_locked(fs->ks))
		dekpool_pause(fs->pool, true);
	if (code == 0)
		code = serve(fs, o, &report_fd);
	daemon_report(&report_fd, code);

	/* The session is gone: no request can queue a file or take a key any more. Join the
	 * background threads before the inodes, keys and KMS they use go away. */
	keystate_stop(fs->ks);         /* when serve did not get to stop it */
	prefetch_free(fs->prefetch);
	fs->prefetch = NULL;
	dekpool_free(fs->pool);
	fs->pool = NULL;
	keycache_free(fs->table.keycache);
	fs->table.keycache = NULL;
	/* No thread is left that could write a header (prefetch's rewraps were the last), and the
	 * control socket is gone: a new mount of the volume may start while we wipe. */
	if (fs->volume_lock_fd >= 0)
		close(fs->volume_lock_fd);
	fs->volume_lock_fd = -1;
	inode_table_free(&fs->table);
	keystate_free(fs->ks);         /* nothing checks it any more */
	fs->ks = NULL;
	keyslab_destroy(&fs->slab);
	kms_free(fs->kms);
	fs->kms = NULL;
	vol_close(&v);
	return code;
}

int main(int argc, char *argv[])
{
	struct rlimit no_core = { 0, 0 };
	struct keyfs_options opts;
	struct keyfs *fs;
	int code;

	/* Keys live in this process: no core dumps, no ptrace by other users, no /proc/pid/mem. */
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	setrlimit(RLIMIT_CORE, &no_core);
	log_init("keyfs", LOG_LEVEL_INFO);
	audit_init("keyfs");
	/* Before any thread and any use of libcurl, OpenSSL or cJSON: their heaps wipe on free. */
	if (secmem_init() < 0) {
		log_err("libcurl cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		return KEYFS_EXIT_FAILURE;
	}
	/* The kernel has applied the caller's umask to every mode we are given. */
	umask(0);

	if (options_parse(argc, argv, &opts) < 0)
		return KEYFS_EXIT_USAGE;
	if (opts.help) {
		options_help(stdout);
		options_free(&opts);
		return KEYFS_EXIT_OK;
	}
	if (opts.version) {
		printf("keyfs %s\n", KEYFS_VERSION);
		options_free(&opts);
		return KEYFS_EXIT_OK;
	}
	if (opts.debug)
		log_init("keyfs", LOG_LEVEL_DEBUG);

	fs = calloc(1, sizeof(*fs));
	if (!fs) {
		log_err("out of memory");
		options_free(&opts);
		return KEYFS_EXIT_FAILURE;
	}
	fs->volume_lock_fd = -1;
	code = run(fs, &opts);
	if (fs->volume_lock_fd >= 0)
		close(fs->volume_lock_fd);
	free(fs);
	options_free(&opts);
	return code;
}
