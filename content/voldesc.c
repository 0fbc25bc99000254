/* voldesc.c: parse and format the volume description (.keyfs), a strict name=value text file */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "keyfs/format.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"

struct field {
	const char *name;
	size_t offset;
	size_t size;
};

#define FIELD(n) { #n, offsetof(struct voldesc, n), sizeof(((struct voldesc *)0)->n) }
static const struct field fields[] = {
	FIELD(volume), FIELD(kms), FIELD(key), FIELD(key_id), FIELD(key_crn), FIELD(keystore),
	FIELD(endpoint), FIELD(instance), FIELD(iam_endpoint), FIELD(ca_file), FIELD(created),
	FIELD(shared), FIELD(cipher),
};

unsigned char voldesc_cipher(const struct voldesc *v)
{
	return v->cipher[0] ? fmt_cipher_by_name(v->cipher) : FMT_CIPHER_XCHACHA20_POLY1305;
}

static int check(const struct voldesc *v, char *err, size_t errlen)
{
	if (v->format < VOLDESC_FORMAT_MIN || v->format > VOLDESC_FORMAT) {
		snprintf(err, errlen, "missing 'format=' (%d or %d)", VOLDESC_FORMAT_MIN, VOLDESC_FORMAT);
		return -EINVAL;
	}
	if (!util_uuid_valid(v->volume)) {
		snprintf(err, errlen, "'volume' must be a lower-case uuid");
		return -EINVAL;
	}
	if (v->cipher[0] && !fmt_cipher_by_name(v->cipher)) {
		snprintf(err, errlen, "unknown cipher '%s' (expected 'xaes-256-gcm' or 'xchacha20-poly1305')", v->cipher);
		return -EINVAL;
	}
	if (!fmt_cipher_valid(voldesc_cipher(v), (enum fmt_layout)v->format)) {
		snprintf(err, errlen, "cipher 'xaes-256-gcm' needs format=2");
		return -EINVAL;
	}
	if (v->shared[0] && strcmp(v->shared, "1") != 0) {
		snprintf(err, errlen, "'shared' must be 1 (or left out)");
		return -EINVAL;
	}
	if (!v->key[0] || !v->key_id[0]) {
		snprintf(err, errlen, "'key' and 'key_id' are required");
		return -EINVAL;
	}
	if (v->key_crn[0] && strncmp(v->key_crn, "crn:", 4) != 0) {
		snprintf(err, errlen, "'key_crn' must be a CRN (crn:v1:...)");
		return -EINVAL;
	}
	if (strcmp(v->kms, VOLDESC_KMS_LOCAL) == 0) {
		if (v->key_crn[0]) {
			snprintf(err, errlen, "'key_crn' is for kms=keyprotect only");
			return -EINVAL;
		}
		if (v->keystore[0] != '/') {
			snprintf(err, errlen, "'keystore' must be an absolute path for kms=local");
			return -EINVAL;
		}
		/* A CA file names a service to trust; with kms=local it would be a silent no-op. */
		if (v->ca_file[0]) {
			snprintf(err, errlen, "'ca_file' is for kms=keyprotect only");
			return -EINVAL;
		}
	} else if (strcmp(v->kms, VOLDESC_KMS_KEYPROTECT) == 0) {
		if (strncmp(v->endpoint, "https://", 8) != 0 || !v->instance[0]) {
			snprintf(err, errlen, "kms=keyprotect needs an https 'endpoint' and an 'instance'");
			return -EINVAL;
		}
		if (v->ca_file[0] && v->ca_file[0] != '/') {
			snprintf(err, errlen, "'ca_file' must be an absolute path");
			return -EINVAL;
		}
	} else {
		snprintf(err, errlen, "unknown kms '%s' (expected 'local' or 'keyprotect')", v->kms);
		return -EINVAL;
	}
	return 0;
}

int voldesc_parse(const char *text, size_t len, struct voldesc *ret, char *err, size_t errlen)
{
	struct voldesc v;
	const char *p = text, *end = text + len;
	unsigned lineno = 0;

	memset(&v, 0, sizeof(v));
	if (len > VOLDESC_MAX) {
		snprintf(err, errlen, "larger than %d bytes", VOLDESC_MAX);
		return -EINVAL;
	}
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *line_end = nl ? nl : end, *eq;
		size_t nlen, vlen;
		bool known = false;

		lineno++;
		if (line_end > p && line_end[-1] == '\r')
			line_end--;
		if (line_end == p || *p == '#')
			goto next;
		if (memchr(p, '\0', (size_t)(line_end - p))) {
			snprintf(err, errlen, "line %u: NUL byte", lineno);
			return -EINVAL;
		}
		eq = memchr(p, '=', (size_t)(line_end - p));
		if (!eq) {
			snprintf(err, errlen, "line %u: expected name=value", lineno);
			return -EINVAL;
		}
		nlen = (size_t)(eq - p);
		vlen = (size_t)(line_end - eq - 1);
		if (nlen == 6 && memcmp(p, "format", 6) == 0) {
			if (vlen != 1 || eq[1] < '1' || eq[1] > '9') {
				snprintf(err, errlen, "line %u: bad format number", lineno);
				return -EINVAL;
			}
			v.format = eq[1] - '0';
			if (v.format > VOLDESC_FORMAT) {
				snprintf(err, errlen, "format %d is newer than this keyfs understands (%d)",
					 v.format, VOLDESC_FORMAT);
				return -EPROTONOSUPPORT;
			}
			goto next;
		}
		for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
			const struct field *f = &fields[i];
			char *dst = (char *)&v + f->offset;

			if (strlen(f->name) != nlen || memcmp(f->name, p, nlen) != 0)
				continue;
			if (vlen >= f->size) {
				snprintf(err, errlen, "line %u: value of '%s' too long", lineno, f->name);
				return -EINVAL;
			}
			if (dst[0]) {
				snprintf(err, errlen, "line %u: '%s' given twice", lineno, f->name);
				return -EINVAL;
			}
			memcpy(dst, eq + 1, vlen);
			dst[vlen] = '\0';
			known = true;
			break;
		}
		if (!known) {
			snprintf(err, errlen, "line %u: unknown name '%.*s'", lineno, (int)(nlen > 64 ? 64 : nlen), p);
			return -EINVAL;
		}
next:
		p = nl ? nl + 1 : end;
	}
	if (check(&v, err, errlen) < 0)
		return -EINVAL;
	*ret = v;
	return 0;
}

int voldesc_format(const struct voldesc *v, char *buf, size_t size)
{
	char err[128];
	size_t used;
	int n;

	if (check(v, err, sizeof(err)) < 0)
		return -EINVAL;
	n = snprintf(buf, size, "# keyfs volume description: names the key, never holds key material\nformat=%d\n",
		     v->format);
	if (n < 0 || (size_t)n >= size)
		return -ENOBUFS;
	used = (size_t)n;
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		const char *val = (const char *)v + fields[i].offset;

		if (!val[0])
			continue;
		if (strpbrk(val, "\r\n"))
			return -EINVAL;
		n = snprintf(buf + used, size - used, "%s=%s\n", fields[i].name, val);
		if (n < 0 || (size_t)n >= size - used)
			return -ENOBUFS;
		used += (size_t)n;
	}
	return (int)used;
}
