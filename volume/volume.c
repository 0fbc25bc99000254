/* volume.c: open a volume for keyfs and keyfsctl alike: description, host trust, one-mount lock, key service */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keyfs/audit.h"
#include "keyfs/exitcode.h"
#include "keyfs/lockspace.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/volkeys.h"
#include "keyfs/volume.h"

/* A value from the backing dir, fit for a terminal: control bytes and backslash as \ooo. */
#define SHOWN_MAX 1024
static const char *shown(const char *s, char out[SHOWN_MAX])
{
	size_t n = 0;

	if (!s[0])
		return "(none)";
	out[n++] = '\'';
	for (; *s && n + 6 < SHOWN_MAX; s++) {
		unsigned char c = (unsigned char)*s;

		if (c < 0x20 || c == 0x7f || c == '\\')
			n += (size_t)snprintf(out + n, SHOWN_MAX - n, "\\%03o", c);
		else
			out[n++] = (char)c;
	}
	out[n++] = '\'';
	out[n] = '\0';
	return out;
}

static int read_desc(struct vol *v, const char *arg)
{
	char err[256], *text = NULL;
	size_t len;
	int r;

	r = util_read_file(v->root_fd, VOLDESC_NAME, VOLDESC_MAX, &text, &len);
	if (r == -ENOENT) {
		if (v->flags & VOL_DAEMON)
			log_err("'%s' is not a keyfs volume (no %s); create one with 'keyfsctl init %s'", arg,
				VOLDESC_NAME, arg);
		else
			log_err("'%s' is not a keyfs volume (no %s): give the backing dir, not the mountpoint", arg,
				VOLDESC_NAME);
		return KEYFS_EXIT_CONFIG;
	}
	if (r < 0) {
		log_err("volume description '%s/%s': %s", v->backing, VOLDESC_NAME,
			r == -EFBIG ? "too large" : r == -EINVAL ? "not a regular file" : strerror(-r));
		return KEYFS_EXIT_CONFIG;
	}
	err[0] = '\0';
	r = voldesc_parse(text, len, &v->vol, err, sizeof(err));
	free(text);
	if (r < 0) {
		log_err("volume description '%s/%s': %s", v->backing, VOLDESC_NAME, err[0] ? err : strerror(-r));
		return KEYFS_EXIT_CONFIG;
	}
	return 0;
}

static int copy_path(char *dst, size_t size, const char *src, const char *what)
{
	if (!src)
		return 0;
	if (strlen(src) >= size) {
		log_err("%s '%s': path too long", what, src);
		return KEYFS_EXIT_USAGE;
	}
	strcpy(dst, src);
	return 0;
}

/* The location stated on the command line, as a record would hold it. Returns 0 or an exit code. */
static int stated(const struct vol_host *h, const struct voldesc *d, struct voldesc *ret)
{
	const char *src[] = { h->kms, h->key, h->endpoint, h->instance, h->iam_endpoint };
	char *dst[] = { ret->kms, ret->key, ret->endpoint, ret->instance, ret->iam_endpoint };
	size_t sizes[] = { sizeof(ret->kms), sizeof(ret->key), sizeof(ret->endpoint), sizeof(ret->instance),
			   sizeof(ret->iam_endpoint) };

	memset(ret, 0, sizeof(*ret));
	memcpy(ret->volume, d->volume, sizeof(ret->volume));
	for (size_t i = 0; i < sizeof(src) / sizeof(src[0]); i++) {
		size_t n = src[i] ? strlen(src[i]) : 0;

		/* URLs as init records them: without trailing slashes. */
		if (i >= 2 && i != 3)
			while (n > 0 && src[i][n - 1] == '/')
				n--;
		if (n >= sizes[i]) {
			log_err("mount option value too long: %.64s...", src[i]);
			return KEYFS_EXIT_USAGE;
		}
		if (n)
			memcpy(dst[i], src[i], n);
		dst[i][n] = '\0';
	}
	return 0;
}

/* A refusal is an audit event too (docs/AUDIT.md): the uuid and key are the description's word. */
static void audit_refused(const struct vol *v, const char *reason, const char *field)
{
	char line[PATH_MAX + 128];

	snprintf(line, sizeof(line), "volume '%s' refused: %s%s%s", v->backing, reason, field ? " of " : "",
		 field ? field : "");
	audit_emit(&(struct audit_event){
		.kind = AUDIT_REFUSED, .volume = v->vol.volume, .backing = v->backing, .key_id = v->vol.key_id,
		.key_crn = v->vol.key_crn, .reason = reason, .latency_ms = -1, .uid = -1, .message = line,
	});
}

/* Does the description agree with the host? Returns 0 or KEYFS_EXIT_UNTRUSTED after saying why. */
static int check_trust(struct vol *v, const struct vol_host *h)
{
	char path[PATH_MAX + 64], msg[PATH_MAX + 128], dir[PATH_MAX], a[SHOWN_MAX], b[SHOWN_MAX];
	struct voldesc trusted;
	int r;

	if (v->stated) {
		r = stated(h, &v->vol, &trusted);
		if (r)
			return r;
	} else {
		r = vol_trust_read(v->vol.volume, &trusted, path, sizeof(path), msg, sizeof(msg));
		if (r == -ENOENT && !msg[0]) {
			if (vol_trust_dir(dir, sizeof(dir)) < 0)
				snprintf(dir, sizeof(dir), "the trust dir");
			log_err("volume '%s' (uuid %s) is not trusted on this host: no record of its key service in %s; "
				"check the key service its %s names and run 'keyfsctl trust %s' (needed once for a volume made on another host or by a keyfs that did not record trust)%s",
				v->backing, v->vol.volume, dir, VOLDESC_NAME, v->backing,
				v->flags & VOL_DAEMON ? ", or state it in mount options (kms=,key=,...; see keyfs(8))" : "");
			audit_refused(v, "untrusted", NULL);
			return KEYFS_EXIT_UNTRUSTED;
		}
		if (r < 0) {
			if (msg[0])
				log_err("%s: refusing to trust it", msg);
			else
				log_err("trust record of volume %s ('%s'): %s", v->vol.volume, path, strerror(-r));
			audit_refused(v, "unsafe_record", NULL);
			return KEYFS_EXIT_UNTRUSTED;
		}
	}
	for (size_t i = 0; i < VOL_LOCATION_FIELDS; i++) {
		const char *name = vol_location_name(i);

		/* The host named these on its command line: the description's value is not used. */
		if ((strcmp(name, "keystore") == 0 && v->keystore[0]) || (strcmp(name, "ca_file") == 0 && v->ca_file[0]))
			continue;
		/* A stated location is checked against the key service's own id once it is open. */
		if (v->stated && (strcmp(name, "key_id") == 0 || strcmp(name, "key_crn") == 0))
			continue;
		if (strcmp(vol_location_value(&v->vol, i), vol_location_value(&trusted, i)) == 0)
			continue;
		if (v->stated)
			log_err("volume '%s': its %s says %s %s but the mount options say %s: refusing it before any key service is contacted",
				v->backing, VOLDESC_NAME, name, shown(vol_location_value(&v->vol, i), a),
				shown(vol_location_value(&trusted, i), b));
		else
			log_err("volume '%s': its %s says %s %s but this host trusts %s (%s): refusing it before any key service is contacted; if the key service really moved, run 'keyfsctl trust %s'",
				v->backing, VOLDESC_NAME, name, shown(vol_location_value(&v->vol, i), a),
				shown(vol_location_value(&trusted, i), b), path, v->backing);
		audit_refused(v, "trust_mismatch", name);
		return KEYFS_EXIT_UNTRUSTED;
	}
	return 0;
}

int vol_open(const char *arg, const struct vol_host *h, unsigned flags, struct vol *ret)
{
	static const struct vol_host none;
	int code;

	memset(ret, 0, sizeof(*ret));
	ret->root_fd = ret->lock_fd = -1;
	ret->flags = flags;
	h = h ? h : &none;
	ret->stated = h->kms != NULL;
	code = copy_path(ret->keystore, sizeof(ret->keystore), h->keystore, "keystore");
	if (!code)
		code = copy_path(ret->ca_file, sizeof(ret->ca_file), h->ca_file, "CA file");
	if (!code)
		code = copy_path(ret->apikey_file, sizeof(ret->apikey_file), h->apikey_file, "API key file");
	if (code)
		return code;
	if (!realpath(arg, ret->backing)) {
		log_err("backing dir '%s': %s", arg, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	ret->root_fd = open(ret->backing, (flags & VOL_DAEMON ? O_PATH : O_RDONLY) | O_DIRECTORY | O_CLOEXEC);
	if (ret->root_fd < 0) {
		if (errno == ENOTDIR)
			log_err("backing dir '%s' is not a directory", arg);
		else
			log_err("backing dir '%s': %s", arg, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	if (fstat(ret->root_fd, &ret->root_st) < 0) {
		log_err("backing dir '%s': %s", arg, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	code = read_desc(ret, arg);
	if (code == 0 && !(flags & VOL_SKIP_TRUST))
		code = check_trust(ret, h);
	return code;
}

/* How long a mount waits for the previous daemon of the volume, whose mount is gone, to exit;
 * and how often it looks. */
#define LOCK_WAIT_MS    10000
#define LOCK_POLL_MS    10

static long ms_since(const struct timespec *t0)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (long)(now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000;
}

/* The daemon holding the lock, for messages: the process vol_lock_owner marked it with (flock
 * holders are not reported by F_GETLK), if it is a keyfs. Returns the pid or 0. */
static pid_t lock_holder(int fd)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_len = (off_t)LOCKSPACE_BASE };
	char path[64], *comm = NULL;
	size_t len;
	pid_t pid = 0;

	if (fcntl(fd, F_GETLK, &fl) < 0 || fl.l_type == F_UNLCK || fl.l_pid <= 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%ld/comm", (long)fl.l_pid);
	if (util_read_file(AT_FDCWD, path, 64, &comm, &len) == 0) {
		if (strcmp(comm, "keyfs\n") == 0)
			pid = fl.l_pid;
		free(comm);
	}
	return pid;
}

/* What holds a volume another mount wants. */
enum holder { HELD_NONE, HELD_EXCLUSIVE, HELD_SHARED };

/*
 * The mode lock: an OFD lock on one byte of .keyfs (LOCKSPACE_MODE), exclusive for an exclusive
 * mount, shared for a shared one. An OFD lock, not a flock: flock reaches other hosts only on
 * some filesystems (NFS emulates it with byte-range locks, Lustre needs -o flock, a local mount
 * never), while the byte-range locks a shared volume needs for its data must cross hosts
 * anyway; a backing filesystem good enough for sharing excludes the wrong kind of mount too.
 * Returns 0 (held, or not available to an exclusive mount: see vol_lock), -EWOULDBLOCK with
 * *ret the holder's kind, or -errno.
 */
static int mode_lock(int fd, bool shared, bool writable, enum holder *ret)
{
	struct flock fl = {
		.l_type = shared ? F_RDLCK : F_WRLCK, .l_whence = SEEK_SET,
		.l_start = (off_t)LOCKSPACE_MODE, .l_len = 1,
	};
	int err;

	if (!shared && !writable)
		return 0;
	if (fcntl(fd, F_OFD_SETLK, &fl) == 0)
		return 0;
	err = errno;
	if (err != EAGAIN && err != EACCES)
		return shared ? -err : 0;
	fl.l_type = F_WRLCK;
	*ret = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type == F_RDLCK ? HELD_SHARED : HELD_EXCLUSIVE;
	return -EWOULDBLOCK;
}

/* Both locks of vol_lock, or neither. Returns 0, -EWOULDBLOCK (*ret says by what), -errno. */
static int mount_lock(int fd, bool shared, bool writable, enum holder *ret)
{
	int r;

	*ret = HELD_EXCLUSIVE;
	/* The flock keeps two exclusive mounts of one host apart whatever the backing filesystem
	 * offers, and makes 'umount && mount' wait for the previous daemon, as it always did. */
	if (!shared && flock(fd, LOCK_EX | LOCK_NB) < 0)
		return errno == EWOULDBLOCK ? -EWOULDBLOCK : -errno;
	r = mode_lock(fd, shared, writable, ret);
	if (r < 0 && !shared)
		flock(fd, LOCK_UN);
	return r;
}

/*
 * One daemon per volume, unless it is shared: two exclusive ones would each cache keys and
 * rewrite partial chunks of the same files without knowing of the other, and lose writes.
 * Shared mounts (docs/LOCKING.md, "Shared volumes") coordinate through byte-range locks
 * instead, and an exclusive mount and shared ones exclude each other through the mode lock.
 * The locks on the volume description live as long as the daemon (its fd is inherited when it
 * goes to the background) and go with it, a crash included. keyfsctl fsck and rewrap do not
 * take them: they run beside a mount.
 *
 * A daemon holds the lock a little after its unmount, while it stops. A lock held while the
 * volume is mounted nowhere is such a daemon (or one starting): 'umount && mount' waits for it,
 * for a bounded time, instead of failing; a volume mounted and live is refused at once. A
 * holder on another host looks the same from here: refused after the wait.
 */
int vol_lock(struct vol *v, bool shared)
{
	int fd = openat(v->root_fd, VOLDESC_NAME, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	bool writable = fd >= 0;
	struct timespec t0;
	enum holder held = HELD_NONE;
	pid_t holder = 0;
	char who[64] = "";
	bool waited = false;
	int r;

	/* Read-only is enough for a flock and a shared lock; an exclusive mount that cannot write
	 * .keyfs keeps shared mounts of other hosts out only through the flock. */
	if (fd < 0 && (errno == EACCES || errno == EROFS || errno == EPERM))
		fd = openat(v->root_fd, VOLDESC_NAME, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		log_err("volume description '%s/%s': %s", v->backing, VOLDESC_NAME, strerror(errno));
		return KEYFS_EXIT_CONFIG;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while ((r = mount_lock(fd, shared, writable, &held)) < 0) {
		if (r == -EINTR)
			continue;
		if (r != -EWOULDBLOCK) {
			close(fd);
			if (shared)
				log_err("volume description '%s/%s': cannot take a byte-range lock on it: %s: a shared mount needs a backing filesystem with OFD byte-range locks (NFSv4, CephFS, a local filesystem)",
					v->backing, VOLDESC_NAME, strerror(-r));
			else
				log_err("volume description '%s/%s': cannot lock it: %s", v->backing, VOLDESC_NAME, strerror(-r));
			return KEYFS_EXIT_CONFIG;
		}
		if (util_mounted_from(KEYFS_FSTYPE, v->backing) == 1) {
			close(fd);
			if (shared)
				log_err("volume '%s' is mounted exclusively by another keyfs (see 'findmnt -t " KEYFS_FSTYPE "'): mount every mount of it with -o shared, or none",
					v->backing);
			else if (held == HELD_SHARED)
				log_err("volume '%s' is mounted shared by another keyfs (see 'findmnt -t " KEYFS_FSTYPE "'): an exclusive mount needs it alone; mount this one with -o shared too",
					v->backing);
			else
				log_err("volume '%s' is already mounted by another keyfs (see 'findmnt -t " KEYFS_FSTYPE "'): one mount per volume unless every mount is shared (-o shared)",
					v->backing);
			return KEYFS_EXIT_MOUNT;
		}
		if (!holder)
			holder = lock_holder(fd);
		if (holder)
			snprintf(who, sizeof(who), " (pid %ld)", (long)holder);
		if (ms_since(&t0) >= LOCK_WAIT_MS) {
			close(fd);
			log_err("volume '%s' is still held by another keyfs%s although it is mounted nowhere here: waited %d s for it to exit; it may still serve files opened before a lazy unmount, be mounted in another mount namespace, or be mounted%s on another host",
				v->backing, who, LOCK_WAIT_MS / 1000,
				shared ? " exclusively" : held == HELD_SHARED ? " shared (then mount this one with -o shared too)" : "");
			return KEYFS_EXIT_MOUNT;
		}
		waited = true;
		nanosleep(&(struct timespec){ .tv_nsec = LOCK_POLL_MS * 1000000L }, NULL);
	}
	if (waited)
		log_info("waited %ld ms for the previous keyfs%s of volume '%s' to exit", ms_since(&t0), who, v->backing);
	v->lock_fd = fd;
	v->locked = true;
	vol_lock_owner(fd);
	return 0;
}

void vol_lock_owner(int lock_fd)
{
	/* Below the lock space: a record lock and an OFD lock conflict even in one process. */
	struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_len = (off_t)LOCKSPACE_BASE };

	/* A record lock names its process (a flock does not): only for messages, so best effort.
	 * flock and record locks do not interact on Linux. */
	if (lock_fd >= 0 && fcntl(lock_fd, F_SETLK, &fl) < 0) {
		/* Then a waiting mount names no pid. */
	}
}

/*
 * key= of a stated location is an alias (or the volume recorded one): the service says, once,
 * which key it names now. The same key as the description's key_id: every later call names that
 * id (the alias may move during the mount). Another key (the alias moved): refused, as any other
 * key would be. Returns 0 (v->kms reopened, or left for the caller's check) or an exit code.
 */
static int stated_alias(struct vol *v, struct kms_config *cfg)
{
	struct kms_err err = { .msg = "" };
	struct kms_key_info info;
	char a[SHOWN_MAX];
	int r;

	r = kms_key_info(v->kms, &info, &err);
	if (r < 0) {
		log_err("volume '%s': key '%s' the mount options state cannot be resolved: %s", v->backing, v->vol.key,
			err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	if (strcmp(info.id, v->vol.key_id) != 0) {
		log_err("volume '%s': its %s says key_id %s but key '%s' the mount options state is key '%s' now: refusing it",
			v->backing, VOLDESC_NAME, shown(v->vol.key_id, a), v->vol.key, info.id);
		audit_refused(v, "trust_mismatch", "key_id");
		return KEYFS_EXIT_UNTRUSTED;
	}
	kms_free(v->kms);
	v->kms = NULL;
	cfg->key_id = v->vol.key_id;
	r = kms_open(cfg, &v->kms, &err);
	if (r < 0) {
		log_err("%s", err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	return 0;
}

int vol_kms_open(struct vol *v, const char *what)
{
	struct kms_config cfg;
	struct kms_err err = { .msg = "" };
	char a[SHOWN_MAX];
	int r, state = -1;

	vol_kms_config(&v->vol, &cfg);
	/* A keystore or CA file the host names overrides the trusted one. */
	if (v->keystore[0])
		cfg.keystore = v->keystore;
	if (v->ca_file[0])
		cfg.ca_file = v->ca_file;
	cfg.apikey_file = v->apikey_file;
	/* A stated location names no key id: the backend finds the key's own. */
	if (v->stated)
		cfg.key_id = NULL;
	if (what && strcmp(v->vol.kms, VOLDESC_KMS_KEYPROTECT) == 0 && !v->apikey_file[0]) {
		const char *creds = getenv("CREDENTIALS_DIRECTORY");

		if (!creds || !creds[0]) {
			log_err("volume '%s' uses Key Protect: give --apikey-file FILE, or set CREDENTIALS_DIRECTORY to a dir holding the API key as 'apikey'",
				v->backing);
			return KEYFS_EXIT_KMS;
		}
	}
	r = kms_open(&cfg, &v->kms, &err);
	if (r < 0) {
		log_err("%s", err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	if (v->stated && strcmp(kms_key_id(v->kms), v->vol.key_id) != 0 &&
	    strcmp(v->vol.kms, VOLDESC_KMS_KEYPROTECT) == 0) {
		r = stated_alias(v, &cfg);
		if (r)
			return r;
	}
	if (v->stated && strcmp(kms_key_id(v->kms), v->vol.key_id) != 0) {
		log_err("volume '%s': its %s says key_id %s but key '%s' of the key service the mount options state has id '%s': refusing it",
			v->backing, VOLDESC_NAME, shown(v->vol.key_id, a), v->vol.key, kms_key_id(v->kms));
		audit_refused(v, "trust_mismatch", "key_id");
		return KEYFS_EXIT_UNTRUSTED;
	}
	r = kms_key_state(v->kms, &state, &err);
	if (r == -EKEYREVOKED) {
		state = KMS_STATE_DESTROYED;
	} else if (r == -ENOKEY || r == -EACCES) {
		log_err("key '%s' is not usable: %s%s", v->vol.key, err.msg[0] ? err.msg : strerror(-r),
			what ? "" : ": contents are unavailable");
		return KEYFS_EXIT_LOCKED;
	} else if (r < 0) {
		log_err("%s", err.msg[0] ? err.msg : strerror(-r));
		return KEYFS_EXIT_KMS;
	}
	v->key_state = state;
	return 0;
}

void vol_close(struct vol *v)
{
	kms_free(v->kms);
	v->kms = NULL;
	if (v->locked && v->lock_fd >= 0)
		close(v->lock_fd);
	v->lock_fd = -1;
	v->locked = false;
	if (v->root_fd >= 0)
		close(v->root_fd);
	v->root_fd = -1;
}
