/* trust.c: the host's trust records: where each volume's key service is, by volume uuid, never from the backing dir */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keyfs/util.h"
#include "keyfs/volume.h"

#define ROOT_TRUST_DIR "/etc/keyfs/volumes"

struct loc_field {
	const char *name;
	size_t offset;
	const char *kms;                /* NULL: every kms */
};

#define LOC(n, k) { #n, offsetof(struct voldesc, n), k }
/* Where secrets would go first: a refusal names the first field that disagrees. */
static const struct loc_field loc_fields[VOL_LOCATION_FIELDS] = {
	LOC(kms, NULL), LOC(keystore, VOLDESC_KMS_LOCAL), LOC(endpoint, VOLDESC_KMS_KEYPROTECT),
	LOC(iam_endpoint, VOLDESC_KMS_KEYPROTECT), LOC(ca_file, VOLDESC_KMS_KEYPROTECT),
	LOC(instance, VOLDESC_KMS_KEYPROTECT), LOC(key, NULL), LOC(key_id, NULL), LOC(key_crn, VOLDESC_KMS_KEYPROTECT),
};

const char *vol_location_name(size_t i)
{
	return i < VOL_LOCATION_FIELDS ? loc_fields[i].name : NULL;
}

const char *vol_location_value(const struct voldesc *d, size_t i)
{
	return i < VOL_LOCATION_FIELDS ? (const char *)d + loc_fields[i].offset : NULL;
}

bool vol_location_applies(const struct voldesc *d, size_t i)
{
	return i < VOL_LOCATION_FIELDS && (!loc_fields[i].kms || strcmp(loc_fields[i].kms, d->kms) == 0);
}

static int join(char *buf, size_t size, const char *a, const char *b)
{
	int n = snprintf(buf, size, "%s%s", a, b);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int vol_trust_dir(char *buf, size_t size)
{
	const char *env = getenv(VOL_TRUST_DIR_ENV), *base;
	struct passwd *pw;

	if (env && env[0])
		return env[0] == '/' ? join(buf, size, env, "") : -EINVAL;
	/* /etc/keyfs/NAME.conf is the systemd unit's: records get a dir of their own. */
	if (geteuid() == 0)
		return join(buf, size, ROOT_TRUST_DIR, "");
	base = getenv("XDG_CONFIG_HOME");
	if (base && base[0] == '/')
		return join(buf, size, base, "/keyfs/volumes");
	base = getenv("HOME");
	if (!base || base[0] != '/') {
		pw = getpwuid(geteuid());
		base = pw && pw->pw_dir && pw->pw_dir[0] == '/' ? pw->pw_dir : NULL;
	}
	if (!base)
		return -ENOENT;
	return join(buf, size, base, "/.config/keyfs/volumes");
}

/* Why there is no trust dir, for msg. Returns r. */
static int dir_error(int r, char *msg, size_t msg_size)
{
	if (r == -EINVAL)
		snprintf(msg, msg_size, "%s must be an absolute path", VOL_TRUST_DIR_ENV);
	else if (r == -ENOENT)
		snprintf(msg, msg_size, "no home dir to keep trust records in: set XDG_CONFIG_HOME or %s",
			 VOL_TRUST_DIR_ENV);
	else
		snprintf(msg, msg_size, "trust dir: %s", strerror(-r));
	return r;
}

/* A record is the host's word only when nobody but the host's admin or this user can change it. */
static int check_owner(const char *what, const char *path, const struct stat *st, char *msg, size_t msg_size)
{
	if (st->st_uid != geteuid() && st->st_uid != 0) {
		snprintf(msg, msg_size, "%s '%s' is owned by uid %u, not by you or root", what, path,
			 (unsigned)st->st_uid);
		return -EPERM;
	}
	if (st->st_mode & (S_IWGRP | S_IWOTH)) {
		snprintf(msg, msg_size, "%s '%s' is writable by group or others (mode %04o)", what, path,
			 (unsigned)(st->st_mode & 07777));
		return -EPERM;
	}
	return 0;
}

static int open_dir(const char *dir, char *msg, size_t msg_size)
{
	struct stat st;
	int fd, r;

	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	r = check_owner("trust dir", dir, &st, msg, msg_size);
	if (r < 0) {
		close(fd);
		return r;
	}
	return fd;
}

/* The trust dir into dir (PATH_MAX) and the path of volume uuid's record into path. Returns
 * 0, -EINVAL (not a volume uuid), or vol_trust_dir's or the path's -errno. */
static int record_path(const char *uuid, char dir[PATH_MAX], char *path, size_t path_size)
{
	int r;

	path[0] = '\0';
	if (!util_uuid_valid(uuid))
		return -EINVAL;
	r = vol_trust_dir(dir, PATH_MAX);
	if (r == 0)
		r = snprintf(path, path_size, "%s/%s", dir, uuid) >= (int)path_size ? -ENAMETOOLONG : 0;
	return r;
}

int vol_trust_read(const char *uuid, struct voldesc *ret, char *path, size_t path_size, char *msg,
		   size_t msg_size)
{
	char dir[PATH_MAX], err[256] = "", *text = NULL;
	struct stat st;
	size_t len;
	int dfd, r;

	msg[0] = path[0] = '\0';
	if (!util_uuid_valid(uuid))
		return -EINVAL;         /* not a trust dir problem: no message */
	r = record_path(uuid, dir, path, path_size);
	if (r < 0)
		return dir_error(r, msg, msg_size);
	dfd = open_dir(dir, msg, msg_size);
	if (dfd < 0)
		return dfd;
	if (fstatat(dfd, uuid, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		r = -errno;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(msg, msg_size, "trust record '%s' is not a regular file", path);
		r = -EPERM;
		goto out;
	}
	r = check_owner("trust record", path, &st, msg, msg_size);
	if (r < 0)
		goto out;
	r = util_read_file(dfd, uuid, VOLDESC_MAX, &text, &len);
	if (r < 0)
		goto out;
	r = voldesc_parse(text, len, ret, err, sizeof(err));
	free(text);
	if (r == 0 && strcmp(ret->volume, uuid) != 0) {
		snprintf(err, sizeof(err), "it records volume %s", ret->volume);
		r = -EINVAL;
	}
	if (r < 0) {
		snprintf(msg, msg_size, "trust record '%s': %s", path, err[0] ? err : strerror(-r));
		r = -EINVAL;
	}
out:
	close(dfd);
	return r;
}

/* mkdir -p: the leaf made with mode, missing parents 0700 (/etc/keyfs also holds API keys). */
static int mkdirs(const char *path, unsigned mode)
{
	char buf[PATH_MAX];

	if (join(buf, sizeof(buf), path, "") < 0)
		return -ENAMETOOLONG;
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0700) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, mode) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

int vol_trust_write(const struct voldesc *d, char *path, size_t path_size, char *msg, size_t msg_size)
{
	char dir[PATH_MAX], text[VOLDESC_MAX + 256];
	bool root = geteuid() == 0;
	int dfd, n, m, r;

	msg[0] = path[0] = '\0';
	if (!util_uuid_valid(d->volume))
		return -EINVAL;
	r = vol_trust_dir(dir, sizeof(dir));
	if (r == 0)
		r = snprintf(path, path_size, "%s/%s", dir, d->volume) >= (int)path_size ? -ENAMETOOLONG : 0;
	if (r < 0)
		return dir_error(r, msg, msg_size);
	/* Records hold no secret: root's are world-readable, a user's are the user's alone. */
	r = mkdirs(dir, root ? 0755 : 0700);
	if (r < 0)
		return r;
	n = snprintf(text, sizeof(text),
		     "# keyfs trust record: this host uses this key service for volume %s\n"
		     "# written by keyfsctl init or trust; the volume's .keyfs must agree with it\n", d->volume);
	if (n < 0 || (size_t)n >= sizeof(text))
		return -ENOBUFS;
	m = voldesc_format(d, text + n, sizeof(text) - (size_t)n);
	if (m < 0)
		return m;
	dfd = open_dir(dir, msg, msg_size);
	if (dfd < 0)
		return dfd;
	r = util_write_file_atomic(dfd, d->volume, text, (size_t)(n + m), root ? 0644 : 0600);
	close(dfd);
	return r;
}

int vol_trust_forget(const char *uuid, char *path, size_t path_size)
{
	char dir[PATH_MAX];
	int r;

	r = record_path(uuid, dir, path, path_size);
	if (r < 0)
		return r;
	return unlink(path) < 0 ? -errno : 0;
}
