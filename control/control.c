/* control.c: the control protocol (include/keyfs/control.h): where a mount's socket lives, the requests and the status answer */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "keyfs/control.h"
#include "keyfs/util.h"

int control_socket_dir(uid_t uid, char *buf, size_t size)
{
	int n = uid == 0 ? snprintf(buf, size, "%s", CONTROL_DIR_ROOT)
			 : snprintf(buf, size, "/run/user/%u/keyfs", (unsigned)uid);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int control_socket_path(const char *mountpoint, uid_t uid, char *buf, size_t size)
{
	/* FNV-1a: a name, not a secret; the directory's owner and mode guard the socket. */
	uint64_t h = 0xcbf29ce484222325ull;
	char dir[256];
	int n;

	for (const unsigned char *p = (const unsigned char *)mountpoint; *p; p++) {
		h ^= *p;
		h *= 0x100000001b3ull;
	}
	if (control_socket_dir(uid, dir, sizeof(dir)) < 0)
		return -ENAMETOOLONG;
	n = snprintf(buf, size, "%s/%016" PRIx64 ".sock", dir, h);
	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

/* The "user_id=N" of a FUSE mount's super options. */
static int super_user_id(char *opts, uid_t *ret)
{
	char *save = NULL;

	for (char *o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		uint64_t v;

		if (strncmp(o, "user_id=", 8) != 0)
			continue;
		if (util_parse_u64(o + 8, 0, UINT32_MAX - 1, &v) < 0)
			return -EINVAL;
		*ret = (uid_t)v;
		return 0;
	}
	return -ENOENT;
}

int control_mount_owner(const char *mountpoint, uid_t *ret_uid)
{
	char fstype[64], source[PATH_MAX], super[1024];
	uid_t uid = 0;
	int r;

	/* The latest mount on it counts: one mounted over a keyfs hides it. */
	r = util_mount_at(mountpoint, fstype, sizeof(fstype), source, sizeof(source), super, sizeof(super));
	if (r == -ENOENT || (r == 0 && strcmp(fstype, KEYFS_FSTYPE) != 0))
		return 0;
	if (r < 0)
		return r;
	if (super_user_id(super, &uid) < 0)
		return -EBADMSG;
	*ret_uid = uid;
	return 1;
}

/* ---- requests ---- */

static const char *const request_names[] = {
	[CONTROL_STATUS] = "status",
	[CONTROL_LOCK] = "lock",
	[CONTROL_UNLOCK] = "unlock",
};

const char *control_request_name(enum control_request req)
{
	return request_names[req];
}

int control_request_parse(const char *line)
{
	for (size_t i = 0; i < sizeof(request_names) / sizeof(request_names[0]); i++) {
		size_t n = strlen(request_names[i]);

		if (strncmp(line, request_names[i], n) == 0 && strcmp(line + n, "\n") == 0)
			return (int)i;
	}
	return -EINVAL;
}

/* ---- the answer: built and read with cJSON ---- */

/* A string member; "" is null. Not UTF-8 bytes (a path may hold any) become U+FFFD. */
static int add_string(cJSON *o, const char *name, const char *s)
{
	size_t size = 3 * strlen(s) + 1;
	cJSON *item = NULL;
	char *fixed;

	if (!s[0])
		return cJSON_AddNullToObject(o, name) ? 0 : -ENOMEM;
	fixed = malloc(size);
	if (fixed && util_utf8_fix(s, fixed, size) == 0)
		item = cJSON_AddStringToObject(o, name, fixed);
	free(fixed);
	return item ? 0 : -ENOMEM;
}

/* A whole number member; negative is null. */
static int add_number(cJSON *o, const char *name, int64_t v)
{
	cJSON *item = v < 0 ? cJSON_AddNullToObject(o, name) : cJSON_AddNumberToObject(o, name, (double)v);

	return item ? 0 : -ENOMEM;
}

/* o as one line into buf; frees o. */
static int print_line(cJSON *o, char *buf, size_t size)
{
	size_t len;

	/* Never more than a line: cJSON says to leave it 5 bytes more than it needs. */
	if (size < 8 || size > INT_MAX ||
	    !cJSON_PrintPreallocated(o, buf, (int)size - 2, false)) {
		cJSON_Delete(o);
		return -ENOBUFS;
	}
	cJSON_Delete(o);
	len = strlen(buf);
	if (len + 2 > size)
		return -ENOBUFS;
	buf[len++] = '\n';
	buf[len] = '\0';
	return (int)len;
}

/* The members after "state", in the order of the line (docs/LOCKING.md): one table for both ways. */
enum member_kind { M_STRING, M_NUMBER, M_BOOL };

static const struct member {
	const char *name;
	enum member_kind kind;
	size_t off, size;               /* in struct control_status; size: strings only */
	int64_t max;                    /* numbers only */
} members[] = {
#define STRING(f) { #f, M_STRING, offsetof(struct control_status, f), sizeof(((struct control_status *)0)->f), 0 }
#define NUMBER(f, max) { #f, M_NUMBER, offsetof(struct control_status, f), 0, max }
	STRING(reason),
	STRING(key),
	NUMBER(key_state, INT32_MAX),
	STRING(last_poll),
	NUMBER(poll, UINT32_MAX),
	NUMBER(grace, UINT32_MAX),
	{ "deactivated", M_BOOL, offsetof(struct control_status, deactivated), 0, 0 },
	STRING(backing),
	STRING(mountpoint),
	STRING(volume),
	STRING(key_id),
	STRING(key_crn),
	NUMBER(last_good_age, INT64_C(1) << 40),
	NUMBER(kms_calls, INT64_C(1) << 52),
	NUMBER(kms_errors, INT64_C(1) << 52),
	NUMBER(kms_latency_ms, INT64_C(1) << 40),
	NUMBER(kms_latency_avg_ms, INT64_C(1) << 40),
	NUMBER(files_keyed, INT64_C(1) << 52),
	NUMBER(audit_dropped, INT64_C(1) << 52),
	NUMBER(kms_wraps, INT64_C(1) << 52),
	NUMBER(kms_unwraps, INT64_C(1) << 52),
	NUMBER(kms_key_errors, INT64_C(1) << 52),
#undef STRING
#undef NUMBER
};

static int add_member(cJSON *o, const struct member *m, const struct control_status *st)
{
	const char *at = (const char *)st + m->off;

	switch (m->kind) {
	case M_STRING:
		return add_string(o, m->name, at);
	case M_NUMBER:
		return add_number(o, m->name, *(const int64_t *)(const void *)at);
	default:
		return cJSON_AddBoolToObject(o, m->name, *(const bool *)at) ? 0 : -ENOMEM;
	}
}

int control_status_format(const struct control_status *st, char *buf, size_t size)
{
	cJSON *o = cJSON_CreateObject();
	int r;

	if (!o)
		return -ENOMEM;
	r = cJSON_AddStringToObject(o, "state", st->locked ? "locked" : "unlocked") ? 0 : -ENOMEM;
	for (size_t i = 0; r == 0 && i < sizeof(members) / sizeof(members[0]); i++)
		r = add_member(o, &members[i], st);
	if (r < 0) {
		cJSON_Delete(o);
		return r;
	}
	return print_line(o, buf, size);
}

int control_error_format(const char *msg, char *buf, size_t size)
{
	cJSON *o = cJSON_CreateObject();

	if (!o)
		return -ENOMEM;
	if (add_string(o, "error", msg) < 0) {
		cJSON_Delete(o);
		return -ENOMEM;
	}
	return print_line(o, buf, size);
}

/* Whether text nests arrays and objects at most CONTROL_DEPTH_MAX deep: checked before cJSON,
 * whose own limit is far deeper, recurses. */
static bool depth_ok(const char *text)
{
	bool in_string = false;
	int depth = 0;

	for (const char *p = text; *p; p++) {
		if (in_string) {
			if (*p == '\\' && p[1])
				p++;
			else if (*p == '"')
				in_string = false;
		} else if (*p == '"') {
			in_string = true;
		} else if (*p == '{' || *p == '[') {
			if (++depth > CONTROL_DEPTH_MAX)
				return false;
		} else if (*p == '}' || *p == ']') {
			depth--;
		}
	}
	return true;
}

/* A string member into buf; missing or null is "". Returns 0 or -EPROTO. */
static int get_string(const cJSON *o, const char *name, char *buf, size_t size)
{
	const cJSON *item = cJSON_GetObjectItemCaseSensitive(o, name);

	buf[0] = '\0';
	if (!item || cJSON_IsNull(item))
		return 0;
	if (!cJSON_IsString(item) || strlen(item->valuestring) >= size)
		return -EPROTO;
	memcpy(buf, item->valuestring, strlen(item->valuestring) + 1);
	return 0;
}

/* A whole number member in [0, max]; missing or null is -1. Returns 0 or -EPROTO. */
static int get_number(const cJSON *o, const char *name, int64_t max, int64_t *ret)
{
	const cJSON *item = cJSON_GetObjectItemCaseSensitive(o, name);
	double d;

	*ret = -1;
	if (!item || cJSON_IsNull(item))
		return 0;
	if (!cJSON_IsNumber(item))
		return -EPROTO;
	d = item->valuedouble;
	if (!(d >= 0 && d <= (double)max) || (double)(int64_t)d != d)
		return -EPROTO;
	*ret = (int64_t)d;
	return 0;
}

/* A true or false member; missing or null is false. Returns 0 or -EPROTO. */
static int get_bool(const cJSON *o, const char *name, bool *ret)
{
	const cJSON *item = cJSON_GetObjectItemCaseSensitive(o, name);

	*ret = cJSON_IsTrue(item);
	return !item || cJSON_IsBool(item) || cJSON_IsNull(item) ? 0 : -EPROTO;
}

static int parse_status(const cJSON *o, struct control_status *st, const char **ret_field)
{
	const cJSON *item;

	*ret_field = "error";
	item = cJSON_GetObjectItemCaseSensitive(o, "error");
	if (item)
		return get_string(o, "error", st->error, sizeof(st->error)) < 0 || !st->error[0] ? -EPROTO : 0;
	*ret_field = "state";
	item = cJSON_GetObjectItemCaseSensitive(o, "state");
	if (!cJSON_IsString(item) || (strcmp(item->valuestring, "locked") != 0 &&
				      strcmp(item->valuestring, "unlocked") != 0))
		return -EPROTO;
	st->locked = strcmp(item->valuestring, "locked") == 0;
	for (size_t i = 0; i < sizeof(members) / sizeof(members[0]); i++) {
		const struct member *m = &members[i];
		char *at = (char *)st + m->off;
		int r;

		*ret_field = m->name;
		if (m->kind == M_STRING)
			r = get_string(o, m->name, at, m->size);
		else if (m->kind == M_NUMBER)
			r = get_number(o, m->name, m->max, (int64_t *)(void *)at);
		else
			r = get_bool(o, m->name, (bool *)at);
		if (r < 0)
			return r;
	}
	*ret_field = NULL;
	return 0;
}

int control_answer_parse(const char *text, struct control_status *st, const char **ret_field)
{
	const char *unused;
	cJSON *o;
	int r;

	if (!ret_field)
		ret_field = &unused;
	*ret_field = NULL;
	memset(st, 0, sizeof(*st));
	if (strnlen(text, CONTROL_ANSWER_MAX + 1) > CONTROL_ANSWER_MAX || !depth_ok(text))
		return -EBADMSG;
	o = cJSON_ParseWithOpts(text, NULL, true);
	if (!o || !cJSON_IsObject(o)) {
		cJSON_Delete(o);
		return -EBADMSG;
	}
	r = parse_status(o, st, ret_field);
	cJSON_Delete(o);
	return r;
}
