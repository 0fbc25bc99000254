/* test_voldesc.c: the volume description parser is strict and round-trips */
#include <errno.h>
#include <stdio.h>

#include "check.h"
#include "keyfs/voldesc.h"

static const char good[] =
	"# comment\n"
	"format=1\n"
	"volume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\n"
	"kms=local\n"
	"key=demo\n"
	"key_id=0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10\n"
	"keystore=/var/lib/keyfs/keystore\n"
	"created=2026-11-22T22:25:00Z\n";

static int parse(const char *text, struct voldesc *v)
{
	char err[256];

	return voldesc_parse(text, strlen(text), v, err, sizeof(err));
}

int main(void)
{
	struct voldesc v, w;
	char buf[VOLDESC_MAX], err[256];
	int n;

	CHECK_EQ(parse(good, &v), 0);
	CHECK_EQ(v.format, 1);
	CHECK(strcmp(v.volume, "2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f") == 0);
	CHECK(strcmp(v.kms, "local") == 0);
	CHECK(strcmp(v.key, "demo") == 0);
	CHECK(strcmp(v.keystore, "/var/lib/keyfs/keystore") == 0);
	CHECK_EQ(v.endpoint[0], 0);

	n = voldesc_format(&v, buf, sizeof(buf));
	CHECK(n > 0);
	CHECK_EQ(voldesc_parse(buf, (size_t)n, &w, err, sizeof(err)), 0);
	CHECK_MEM(&v, &w, sizeof(v));
	CHECK_EQ(voldesc_format(&v, buf, 20), -ENOBUFS);

	/* CRLF line ends are tolerated. */
	CHECK_EQ(parse("format=1\r\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\r\nkms=local\r\nkey=a\r\n"
		       "key_id=b\r\nkeystore=/k\r\n", &v), 0);

	/* format=2 (the v2 file layout) is understood; 3 is newer than this keyfs. */
	CHECK_EQ(parse("format=2\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=local\nkey=a\n"
		       "key_id=b\nkeystore=/k\n", &v), 0);
	CHECK_EQ(v.format, 2);
	CHECK_EQ(parse("format=3\n", &v), -EPROTONOSUPPORT);
	CHECK_EQ(voldesc_parse("format=1\nbogus=1\n", 17, &v, err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "line 2") != NULL && strstr(err, "bogus") != NULL);
	CHECK_EQ(parse("format=1\nkey=a\nkey=b\n", &v), -EINVAL);
	CHECK_EQ(parse("format=1\nno equals sign\n", &v), -EINVAL);
	CHECK_EQ(parse("kms=local\n", &v), -EINVAL);                    /* no format */
	CHECK_EQ(parse("format=1\nvolume=not-a-uuid\nkms=local\nkey=a\nkey_id=b\nkeystore=/k\n", &v), -EINVAL);
	CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=local\nkey=a\nkey_id=b\n"
		       "keystore=relative\n", &v), -EINVAL);
	CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=vault\nkey=a\nkey_id=b\n", &v),
		 -EINVAL);
	CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\nkey_id=b\n"
		       "endpoint=http://plain\ninstance=x\n", &v), -EINVAL);
	CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\nkey_id=b\n"
		       "endpoint=https://us-south.kms.cloud.ibm.com\ninstance=x\n", &v), 0);
	/* ca_file: optional, keyprotect only, absolute, and it round-trips. */
	{
		static const char kp[] =
			"format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\nkey_id=a\n"
			"endpoint=https://127.0.0.1:9443\ninstance=x\niam_endpoint=https://127.0.0.1:9443\n"
			"ca_file=/etc/keyfs/ca.pem\ncreated=2026-11-22T22:25:00Z\n";
		static const char relative_ca[] =
			"format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\n"
			"key_id=b\nendpoint=https://h\ninstance=x\nca_file=ca.pem\n";

		CHECK_EQ(parse(kp, &v), 0);
		CHECK(strcmp(v.ca_file, "/etc/keyfs/ca.pem") == 0);
		n = voldesc_format(&v, buf, sizeof(buf));
		CHECK(n > 0);
		CHECK(strstr(buf, "\nca_file=/etc/keyfs/ca.pem\n") != NULL);
		CHECK_EQ(voldesc_parse(buf, (size_t)n, &w, err, sizeof(err)), 0);
		CHECK_MEM(&v, &w, sizeof(v));
		/* Without it the field stays empty and is not written. */
		CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\n"
			       "key_id=b\nendpoint=https://h\ninstance=x\n", &v), 0);
		CHECK_EQ(v.ca_file[0], 0);
		n = voldesc_format(&v, buf, sizeof(buf));
		CHECK(n > 0 && strstr(buf, "ca_file") == NULL);
		CHECK_EQ(voldesc_parse(relative_ca, strlen(relative_ca), &v, err, sizeof(err)), -EINVAL);
		CHECK(strstr(err, "ca_file") != NULL && strstr(err, "absolute") != NULL);
		CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=keyprotect\nkey=a\n"
			       "key_id=b\nendpoint=https://h\ninstance=x\nca_file=/a\nca_file=/b\n", &v), -EINVAL);
		CHECK_EQ(parse("format=1\nvolume=2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\nkms=local\nkey=a\nkey_id=b\n"
			       "keystore=/k\nca_file=/etc/keyfs/ca.pem\n", &v), -EINVAL);
	}
	/* shared: optional, 1 only, and it round-trips; without it nothing is written. */
	{
		char text[sizeof(good) + 16];

		snprintf(text, sizeof(text), "%sshared=1\n", good);
		CHECK_EQ(parse(text, &v), 0);
		CHECK(strcmp(v.shared, "1") == 0);
		n = voldesc_format(&v, buf, sizeof(buf));
		CHECK(n > 0 && strstr(buf, "\nshared=1\n") != NULL);
		CHECK_EQ(voldesc_parse(buf, (size_t)n, &w, err, sizeof(err)), 0);
		CHECK_MEM(&v, &w, sizeof(v));
		snprintf(text, sizeof(text), "%sshared=0\n", good);
		CHECK_EQ(voldesc_parse(text, strlen(text), &v, err, sizeof(err)), -EINVAL);
		CHECK(strstr(err, "'shared' must be 1") != NULL);
		CHECK_EQ(parse(good, &v), 0);
		CHECK_EQ(v.shared[0], 0);
		n = voldesc_format(&v, buf, sizeof(buf));
		CHECK(n > 0 && strstr(buf, "shared") == NULL);
	}
	{
		char big[1000] = "format=1\ninstance=";
		memset(big + strlen(big), 'x', 200);
		CHECK_EQ(parse(big, &v), -EINVAL);                      /* value longer than its field */
	}
	CHECK_EQ(voldesc_parse(good, VOLDESC_MAX + 1, &v, err, sizeof(err)), -EINVAL);
	CHECK_EQ(voldesc_parse("format=1\nkey=a\0b\n", 16, &v, err, sizeof(err)), -EINVAL);
	return check_done();
}
