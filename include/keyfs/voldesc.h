/* voldesc.h: the volume description kept at the backing root (never a secret); pure parse and format */
#ifndef KEYFS_VOLDESC_H
#define KEYFS_VOLDESC_H

#include <limits.h>
#include <stddef.h>

/* Reserved entry at the backing root: hidden from the mount and refused as a name there. */
#define VOLDESC_NAME            ".keyfs"
#define VOLDESC_MAX             8192            /* largest description file accepted */
#define VOLDESC_FORMAT          2               /* newest understood: the file layout (enum fmt_layout) */
#define VOLDESC_FORMAT_MIN      1

#define VOLDESC_KMS_LOCAL       "local"
#define VOLDESC_KMS_KEYPROTECT  "keyprotect"

/*
 * Text file, one "name=value" per line, '#' comments, UTF-8, no secrets:
 *   format=1|2                    the layout of every file of the volume (docs/FORMAT.md)
 *   volume=<uuid>                 random at init, bound into every wrapped DEK
 *   kms=local|keyprotect
 *   key=<name | key id | CRN>     what the user named at init
 *   key_id=<id>                   the id written in file headers: the key's uuid, resolved at init
 *                                 (an alias given to init never lands here; older volumes may hold one)
 *   key_crn=<CRN>                 keyprotect only, optional: the key's CRN, resolved at init
 *   keystore=<dir>                local only
 *   endpoint=<url> instance=<guid> iam_endpoint=<url>    keyprotect only
 *   ca_file=<absolute path>       keyprotect only, optional: CA bundle the service's certificate
 *                                 chains to (a private CA); the mount's -o ca_file= overrides it
 *   created=<RFC 3339 UTC>
 *   shared=1                      optional: every mount is shared (keyfsctl init --shared)
 *   cipher=xaes-256-gcm|xchacha20-poly1305
 *                                 optional (format 2 only): the chunk AEAD of the volume's new
 *                                 files; left out, xchacha20-poly1305 (volumes made before it)
 * Unknown names are an error (a newer format), so nothing is silently ignored.
 */
struct voldesc {
	int format;
	char volume[37];
	char kms[16];
	char key[256];
	char key_id[256];
	char key_crn[512];
	char keystore[PATH_MAX];
	char endpoint[512];
	char instance[64];
	char iam_endpoint[512];
	char ca_file[PATH_MAX];
	char created[32];
	char shared[2];                 /* "1": mounts are shared unless -o noshared; else "" */
	char cipher[24];                /* fmt_cipher_name of new files' cipher, or "" (xchacha20-poly1305) */
};

/* The cipher id (FMT_CIPHER_*) of v's new files. */
unsigned char voldesc_cipher(const struct voldesc *v);

/* Parse len bytes of text. On failure returns -EINVAL (or -EPROTONOSUPPORT for a newer format)
 * and writes a message naming the line into err. */
int voldesc_parse(const char *text, size_t len, struct voldesc *ret, char *err, size_t errlen);

/* Format v into buf. Returns the length written (without NUL), -EINVAL for a field that cannot
 * be written (newline or missing required field), -ENOBUFS when buf is too small. */
int voldesc_format(const struct voldesc *v, char *buf, size_t size);

#endif
