/* test_volkeys.c: the associated data every wrapped DEK is bound to, exactly as FORMAT.md gives it */
#include <string.h>

#include "keyfs/volkeys.h"

#include "check.h"

static void test_file_aad(void)
{
	static const char volume[] = "3bc66e55-0175-4ad5-9618-40e74122d38e";
	uint8_t fid[FMT_FILE_ID_SIZE];
	struct vol_aad a;

	for (size_t i = 0; i < sizeof(fid); i++)
		fid[i] = (uint8_t)(0xf0 + i);   /* f0 f1 ... ff: lower-case hex, no separators */
	vol_file_aad(volume, fid, &a);
	/* Order matters: Key Protect needs the same array in the same order to unwrap. */
	CHECK(strcmp(a.aad[0], volume) == 0);
	CHECK(strcmp(a.aad[1], "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff") == 0);
	CHECK(a.aad[1] == a.file_id_hex);
	CHECK_EQ(strlen(a.aad[1]), 2 * FMT_FILE_ID_SIZE);
}

int main(void)
{
	test_file_aad();
	return check_done();
}
