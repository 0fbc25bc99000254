/* cmd_inspect.c: keyfsctl inspect: the public keyfs header of files, read from the backing side without a key */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/content.h"
#include "keyfs/exitcode.h"
#include "keyfs/format.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"
#include "cli.h"

#define KEYFS_FSTYPE "fuse.keyfs"

enum { OPT_JSON = CLI_OPT_BASE, OPT_HELP };

static const struct option inspect_options[] = {
	{ "json", no_argument, NULL, OPT_JSON },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

struct mount {
	char *mountpoint;
	char *root;                     /* the mount's root inside its filesystem (bind mounts) */
	char *fstype;
	char *source;
	dev_t dev;
};

struct mounts {
	struct mount *v;
	size_t n;
};

struct result {
	const char *path;               /* as the user typed it */
	char backing[PATH_MAX];
	const struct mount *mount;      /* NULL when not inside a live keyfs mount */
	bool empty;                     /* backing size 0: no header yet */
	struct fmt_header hdr;
	uint64_t backing_size;
	char file_id[2 * FMT_FILE_ID_SIZE + 1];
	char wrapped_sha256[2 * crypto_hash_sha256_BYTES + 1];
};


static void mounts_free(struct mounts *m)
{
	for (size_t i = 0; i < m->n; i++) {
		free(m->v[i].mountpoint);
		free(m->v[i].root);
		free(m->v[i].fstype);
		free(m->v[i].source);
	}
	free(m->v);
	m->v = NULL;
	m->n = 0;
}

/* All mounts of this namespace, in mount order (a later one covers an earlier one). */
static int mounts_read(struct mounts *ret)
{
	struct mounts m = { NULL, 0 };
	char *line = NULL;
	size_t cap = 0;
	FILE *f;

	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -errno;
	while (getline(&line, &cap, f) > 0) {
		/* id parent maj:min root mountpoint options [optional...] - fstype source superoptions */
		char *fields[6] = { NULL }, *save = NULL, *tok, *fstype = NULL, *source = NULL;
		unsigned maj, min;
		int nf = 0;
		struct mount *v;

		line[strcspn(line, "\n")] = '\0';
		for (tok = strtok_r(line, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
			if (nf < 6) {
				fields[nf++] = tok;
			} else if (strcmp(tok, "-") == 0) {
				fstype = strtok_r(NULL, " ", &save);
				source = strtok_r(NULL, " ", &save);
				break;
			}
		}
		if (nf < 6 || !fstype || !source || sscanf(fields[2], "%u:%u", &maj, &min) != 2)
			continue;
		v = realloc(m.v, (m.n + 1) * sizeof(*v));
		if (!v)
			goto nomem;
		m.v = v;
		/* Counted at once, so that mounts_free frees whatever part of it was allocated. */
		v = &m.v[m.n++];
		*v = (struct mount){
			.mountpoint = strdup(fields[4]),
			.root = strdup(fields[3]),
			.fstype = strdup(fstype),
			.source = strdup(source),
			.dev = makedev(maj, min),
		};
		if (!v->mountpoint || !v->root || !v->fstype || !v->source)
			goto nomem;
		cli_mountinfo_unescape(v->mountpoint);
		cli_mountinfo_unescape(v->root);
		cli_mountinfo_unescape(v->source);
	}
	free(line);
	fclose(f);
	*ret = m;
	return 0;
nomem:
	free(line);
	fclose(f);
	mounts_free(&m);
	return -ENOMEM;
}

/* The mount that holds the absolute, normalised path: the longest mountpoint prefix, the latest on ties. */
static const struct mount *mount_of(const struct mounts *m, const char *path, size_t *ret_len)
{
	const struct mount *best = NULL;
	size_t best_len = 0;

	for (size_t i = 0; i < m->n; i++) {
		const char *mp = m->v[i].mountpoint;
		size_t n = strlen(mp);

		if (strcmp(mp, "/") == 0)
			n = 0;
		else if (strncmp(path, mp, n) != 0 || (path[n] != '\0' && path[n] != '/'))
			continue;
		if (!best || n >= best_len) {
			best = &m->v[i];
			best_len = n;
		}
	}
	*ret_len = best_len;
	return best;
}

/* Map a path inside a keyfs mount to its backing file: source + root + the rest. */
static int map_to_backing(const struct mount *mt, const char *path, size_t mplen, char *out, size_t size)
{
	const char *root = strcmp(mt->root, "/") == 0 ? "" : mt->root;
	int n;

	if (mt->source[0] != '/')
		return -EINVAL;
	n = snprintf(out, size, "%s%s%s", mt->source, root, path + mplen);
	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

/* realpath() of the parent, then the last component as typed: a symlink stays a symlink. */
static int real_parent_path(const char *arg, char *out, size_t size)
{
	char buf[PATH_MAX], dir[PATH_MAX];
	const char *base, *parent;
	char *slash;
	size_t n;
	int r;

	r = cli_copy(buf, sizeof(buf), arg);
	if (r < 0)
		return r;
	n = strlen(buf);
	while (n > 1 && buf[n - 1] == '/')
		buf[--n] = '\0';
	slash = strrchr(buf, '/');
	if (slash) {
		*slash = '\0';
		parent = slash == buf ? "/" : buf;
		base = slash + 1;
	} else {
		parent = ".";
		base = buf;
	}
	if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
		if (slash)
			*slash = '/';
		if (!realpath(buf, out))
			return -errno;
		return 0;
	}
	if (!realpath(parent, dir))
		return -errno;
	r = snprintf(out, size, "%s%s%s", dir, strcmp(dir, "/") == 0 ? "" : "/", base);
	if (r < 0 || (size_t)r >= size)
		return -ENAMETOOLONG;
	return 0;
}

/*
 * Find the backing file of arg. Paths inside a keyfs mount map lexically, so that a locked,
 * hung or dead mount is never asked anything; other paths resolve their parent, which may
 * lead into a mount through a symlink.
 */
static int locate(const struct mounts *m, struct result *res)
{
	char path[PATH_MAX];
	const struct mount *mt;
	size_t mplen;
	int r;

	r = cli_abs_path(res->path, path, sizeof(path));
	if (r < 0)
		goto fail;
	mt = mount_of(m, path, &mplen);
	if (!mt || strcmp(mt->fstype, KEYFS_FSTYPE) != 0) {
		r = real_parent_path(res->path, path, sizeof(path));
		if (r < 0)
			goto fail;
		mt = mount_of(m, path, &mplen);
	}
	if (mt && strcmp(mt->fstype, KEYFS_FSTYPE) == 0) {
		r = map_to_backing(mt, path, mplen, res->backing, sizeof(res->backing));
		if (r == -EINVAL) {
			log_err("'%s' is inside keyfs mount '%s', whose backing dir '%s' is not an absolute path",
				res->path, mt->mountpoint, mt->source);
			return KEYFS_EXIT_CONFIG;
		}
		if (r < 0)
			goto fail;
		res->mount = mt;
		return 0;
	}
	r = cli_copy(res->backing, sizeof(res->backing), path);
	if (r == 0)
		return 0;
fail:
	if (r == -ENOENT || r == -ENOTDIR) {
		log_err("'%s' does not exist", res->path);
		return KEYFS_EXIT_CONFIG;
	}
	log_err("'%s': %s", res->path, strerror(-r));
	return KEYFS_EXIT_IO;
}

static int read_one(struct result *res)
{
	const char *base = strrchr(res->backing, '/');
	uint8_t digest[crypto_hash_sha256_BYTES];
	struct stat st;
	int fd, r, rc = 0;

	base = base ? base + 1 : res->backing;
	if (lstat(res->backing, &st) < 0) {
		if (errno == ENOENT || errno == ENOTDIR) {
			log_err("'%s' does not exist", res->path);
			return KEYFS_EXIT_CONFIG;
		}
		log_err("'%s': %s", res->path, strerror(errno));
		return KEYFS_EXIT_IO;
	}
	if (S_ISDIR(st.st_mode)) {
		log_err("'%s' is not a keyfs file: it is a directory", res->path);
		return KEYFS_EXIT_CONFIG;
	}
	if (S_ISLNK(st.st_mode)) {
		log_err("'%s' is not a keyfs file: it is a symbolic link", res->path);
		return KEYFS_EXIT_CONFIG;
	}
	if (!S_ISREG(st.st_mode)) {
		log_err("'%s' is not a keyfs file: it is not a regular file", res->path);
		return KEYFS_EXIT_CONFIG;
	}
	fd = open(res->backing, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		log_err("'%s': %s", res->path, strerror(errno));
		return KEYFS_EXIT_IO;
	}
	if (fstat(fd, &st) < 0) {
		log_err("'%s': %s", res->path, strerror(errno));
		rc = KEYFS_EXIT_IO;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		log_err("'%s' is not a keyfs file: it is not a regular file", res->path);
		rc = KEYFS_EXIT_CONFIG;
		goto out;
	}
	/* A symlink in the backing tree that leads back into the mount would show us plaintext. */
	if (res->mount && st.st_dev == res->mount->dev) {
		log_err("'%s' resolves into the keyfs mount '%s' itself: inspect its backing file instead",
			res->path, res->mount->mountpoint);
		rc = KEYFS_EXIT_CONFIG;
		goto out;
	}
	res->backing_size = (uint64_t)st.st_size;
	if (st.st_size == 0) {
		res->empty = true;
		goto out;
	}
	r = content_header_read(fd, &res->hdr, NULL);
	if (r == -ENODATA) {
		res->empty = true;
		res->backing_size = 0;
		goto out;
	}
	if (r < 0 && strcmp(base, VOLDESC_NAME) == 0) {
		log_err("'%s' is the volume description of a keyfs volume (%s), not a keyfs file: it holds no file data",
			res->path, VOLDESC_NAME);
		rc = KEYFS_EXIT_CONFIG;
	} else if (r == -EIO) {
		log_err("'%s' is not a keyfs file: %s", res->path, st.st_size < FMT_DATA_OFFSET ?
			"it is shorter than a keyfs header" : "it has no valid keyfs header");
		rc = KEYFS_EXIT_CONFIG;
	} else if (r == -EPROTONOSUPPORT) {
		log_err("'%s' has a keyfs header of a format version or cipher this keyfsctl does not know", res->path);
		rc = KEYFS_EXIT_CONFIG;
	} else if (r < 0) {
		log_err("'%s': reading its header: %s", res->path, strerror(-r));
		rc = KEYFS_EXIT_IO;
	}
	if (rc)
		goto out;
	fmt_file_id_hex(res->hdr.file_id, res->file_id);
	crypto_hash_sha256(digest, res->hdr.wrapped, res->hdr.wrapped_len);
	util_hex(digest, sizeof(digest), res->wrapped_sha256);
	if (!fmt_backing_size_valid(res->backing_size))
		log_warn("'%s': backing size %" PRIu64 " is not one a whole keyfs file has (truncated?)",
			 res->path, res->backing_size);
out:
	close(fd);
	return rc;
}

static void print_text(const struct result *res, bool first)
{
	const char *cipher;

	if (!first)
		putchar('\n');
	printf("path: %s\n", res->path);
	printf("backing: %s\n", res->backing);
	if (res->mount)
		printf("mount: %s (mounted)\n", res->mount->mountpoint);
	else
		printf("mount: none\n");
	if (res->empty) {
		printf("format: none (empty file, no header yet)\n");
		printf("plaintext_size: 0\n");
		return;
	}
	cipher = fmt_cipher_name(res->hdr.cipher);
	printf("format: %u\n", (unsigned)res->hdr.version);
	if (cipher)
		printf("cipher: %s\n", cipher);
	else
		printf("cipher: unknown (%u)\n", (unsigned)res->hdr.cipher);
	printf("chunk_size: %" PRIu32 "\n", res->hdr.chunk_size);
	printf("file_id: %s\n", res->file_id);
	printf("key: %s\n", res->hdr.key_id);
	printf("key_version: %s\n", res->hdr.key_version);
	printf("plaintext_size: %" PRIu64 "\n", fmt_plain_size(res->backing_size));
	printf("backing_size: %" PRIu64 "\n", res->backing_size);
	printf("wrapped_dek_sha256: %s\n", res->wrapped_sha256);
}

static void json_field(const char *name, const char *value, bool last)
{
	printf("    \"%s\": ", name);
	if (value)
		util_json_string(stdout, value);
	else
		fputs("null", stdout);
	fputs(last ? "\n" : ",\n", stdout);
}

static void print_json(const struct result *res, bool first)
{
	const char *cipher = res->empty ? NULL : fmt_cipher_name(res->hdr.cipher);

	fputs(first ? "  {\n" : ",\n  {\n", stdout);
	json_field("path", res->path, false);
	if (res->empty)
		printf("    \"format\": null,\n");
	else
		printf("    \"format\": %u,\n", (unsigned)res->hdr.version);
	json_field("cipher", cipher, false);
	if (res->empty)
		printf("    \"chunk_size\": null,\n");
	else
		printf("    \"chunk_size\": %" PRIu32 ",\n", res->hdr.chunk_size);
	json_field("file_id", res->empty ? NULL : res->file_id, false);
	json_field("key", res->empty ? NULL : res->hdr.key_id, false);
	json_field("key_version", res->empty ? NULL : res->hdr.key_version, false);
	printf("    \"plaintext_size\": %" PRIu64 ",\n", res->empty ? 0 : fmt_plain_size(res->backing_size));
	printf("    \"backing_size\": %" PRIu64 ",\n", res->backing_size);
	json_field("wrapped_dek_sha256", res->empty ? NULL : res->wrapped_sha256, false);
	json_field("backing", res->backing, false);
	if (res->mount) {
		printf("    \"mount\": {\"mountpoint\": ");
		util_json_string(stdout, res->mount->mountpoint);
		printf(", \"state\": \"mounted\"}\n");
	} else {
		printf("    \"mount\": null\n");
	}
	fputs("  }", stdout);
}

int cmd_inspect(int argc, char **argv)
{
	struct mounts mounts = { NULL, 0 };
	struct result *res;
	char **paths;
	bool json = false, any = false;
	int npaths = 0, c, r, rc = KEYFS_EXIT_OK;

	paths = calloc((size_t)argc + 1, sizeof(*paths));
	res = malloc(sizeof(*res));
	if (!paths || !res) {
		free(paths);
		free(res);
		log_err("out of memory");
		return KEYFS_EXIT_FAILURE;
	}
	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:h", inspect_options, NULL)) != -1) {
		switch (c) {
		case 1: paths[npaths++] = optarg; break;
		case OPT_JSON: json = true; break;
		case 'h':
		case OPT_HELP:
			cli_print_usage(stdout, "inspect");
			goto out;
		default:
			rc = cli_option_error("inspect", c, argv);
			goto out;
		}
	}
	while (optind < argc)
		paths[npaths++] = argv[optind++];
	if (npaths == 0) {
		rc = cli_usage_error("inspect", "missing PATH");
		goto out;
	}
	if (sodium_init() < 0) {
		log_err("libsodium cannot be initialised");
		rc = KEYFS_EXIT_FAILURE;
		goto out;
	}
	r = mounts_read(&mounts);
	if (r < 0)
		log_warn("cannot read /proc/self/mountinfo (%s): paths inside mounts are taken as backing paths",
			 strerror(-r));
	if (json)
		fputs("[\n", stdout);
	for (int i = 0; i < npaths; i++) {
		int one;

		memset(res, 0, sizeof(*res));
		res->path = paths[i];
		one = locate(&mounts, res);
		if (one == 0)
			one = read_one(res);
		if (one) {
			/* Any I/O error outranks "not a keyfs file" in the exit code. */
			if (rc != KEYFS_EXIT_IO)
				rc = one;
			continue;
		}
		if (json)
			print_json(res, !any);
		else
			print_text(res, !any);
		any = true;
	}
	if (json)
		fputs(any ? "\n]\n" : "]\n", stdout);
out:
	mounts_free(&mounts);
	free(res);
	free(paths);
	return rc;
}
