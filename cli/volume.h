/* volume.h: the key service options of fsck and rewrap, over the volume layer (private to cli/) */
#ifndef KEYFS_CLI_VOLUME_H
#define KEYFS_CLI_VOLUME_H

#include <limits.h>
#include <stdbool.h>

#include "keyfs/kms.h"
#include "keyfs/voldesc.h"
#include "keyfs/volume.h"
#include "cli.h"

/* The key service options fsck and rewrap share: add CLI_KMS_OPTIONS to the getopt table and
 * pass every option value to cli_kms_option first. */
enum { CLI_OPT_KEYSTORE = CLI_OPT_BASE + 64, CLI_OPT_APIKEY_FILE, CLI_OPT_CA_FILE };
#define CLI_KMS_OPTIONS                                                                 \
	{ "keystore", required_argument, NULL, CLI_OPT_KEYSTORE },                      \
	{ "apikey-file", required_argument, NULL, CLI_OPT_APIKEY_FILE },                \
	{ "ca-file", required_argument, NULL, CLI_OPT_CA_FILE }
#define CLI_KMS_USAGE "[--keystore DIR] [--apikey-file F] [--ca-file F]"

struct cli_kms_args {
	const char *keystore;           /* local: instead of the keystore recorded at init */
	const char *apikey_file;        /* keyprotect: else $CREDENTIALS_DIRECTORY/apikey */
	const char *ca_file;            /* keyprotect: instead of the CA file recorded at init */
};

/* Take option c (with optarg) into a when it is one of CLI_KMS_OPTIONS. Returns 1 when taken. */
int cli_kms_option(struct cli_kms_args *a, int c, const char *optarg);

/* Open the volume whose backing dir is arg: its description, checked against the host's trust
 * (the volume layer, shared with the daemon), with a's --keystore and --ca-file as the host's
 * word; what names the command ("fsck"). Returns 0 or an exit code after printing why (3: not a
 * volume, 11: not trusted). */
int cli_volume_open(const char *arg, const struct cli_kms_args *a, const char *what, struct vol *ret);

/* Open the volume's key service and check its key can unwrap: active or deactivated. Returns
 * 0, or an exit code after printing why: 4 key service unusable, 8 key suspended or destroyed.
 * what names the command for messages ("fsck"). */
int cli_volume_kms(struct vol *v, const char *what);

void cli_volume_close(struct vol *v);

/* cli_volume_open without the trust check (keyfsctl trust --resolve-key checks the record itself). */
int cli_volume_open_untrusted(const char *arg, const struct cli_kms_args *a, const char *what, struct vol *ret);

/* Does key_id name a key by alias? Volumes made before init resolved the key recorded the alias
 * given (Key Protect; a local key id is always its uuid): not a uuid, not a CRN. */
bool cli_key_id_is_alias(const char *key_id);

/* One stderr line for such a volume: which command records the key's uuid instead. */
void cli_key_id_hint(const char *backing, const char *key_id);

#endif
