/* test_control.c: the control protocol (control/control.c): the status line both sides speak, its bounds, the requests */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyfs/control.h"

#include "check.h"

/* The status docs/LOCKING.md shows, as the daemon sends it: members in that order, no spaces. */
static const char doc_line[] =
	"{\"state\":\"locked\",\"reason\":\"key-destroyed\",\"key\":\"0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10\","
	"\"key_state\":5,\"last_poll\":\"2026-11-22T23:30:00Z\",\"poll\":30,\"grace\":300,\"deactivated\":false,"
	"\"backing\":\"/srv/data.keyfs\",\"mountpoint\":\"/srv/data\","
	"\"volume\":\"2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f\",\"key_id\":\"0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10\","
	"\"key_crn\":null,\"last_good_age\":4,\"kms_calls\":120,\"kms_errors\":0,\"kms_latency_ms\":12,"
	"\"kms_latency_avg_ms\":15,\"files_keyed\":3,\"audit_dropped\":0,\"kms_wraps\":41,\"kms_unwraps\":1200,"
	"\"kms_key_errors\":2}\n";

static struct control_status doc(void)
{
	struct control_status st = {
		.locked = true, .reason = "key-destroyed", .key = "0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10",
		.key_state = 5, .last_poll = "2026-11-22T23:30:00Z", .poll = 30, .grace = 300,
		.backing = "/srv/data.keyfs", .mountpoint = "/srv/data",
		.volume = "2f1b6c1e-8a7d-4c3b-9e2f-0a1b2c3d4e5f", .key_id = "0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10",
		.last_good_age = 4, .kms_calls = 120, .kms_errors = 0, .kms_latency_ms = 12, .kms_latency_avg_ms = 15,
		.files_keyed = 3, .audit_dropped = 0, .kms_wraps = 41, .kms_unwraps = 1200, .kms_key_errors = 2,
	};
	return st;
}

static void test_format(void)
{
	struct control_status st = doc();
	char buf[CONTROL_ANSWER_MAX];

	CHECK_EQ(control_status_format(&st, buf, sizeof(buf)), (int)strlen(doc_line));
	CHECK(strcmp(buf, doc_line) == 0);
	/* Nulls: an unlocked mount has no reason, a purged key no state number. */
	st.locked = false;
	st.reason[0] = '\0';
	st.key_state = -1;
	st.deactivated = true;
	CHECK(control_status_format(&st, buf, sizeof(buf)) > 0);
	CHECK(strstr(buf, "{\"state\":\"unlocked\",\"reason\":null,") == buf);
	CHECK(strstr(buf, ",\"key_state\":null,") != NULL);
	CHECK(strstr(buf, ",\"deactivated\":true,") != NULL);
	/* A backing path need not be UTF-8; the line must be: U+FFFD. Control bytes are escaped. */
	snprintf(st.backing, sizeof(st.backing), "/srv/a\xff" "b\x1b[2J\"q");
	CHECK(control_status_format(&st, buf, sizeof(buf)) > 0);
	CHECK(strstr(buf, "\"backing\":\"/srv/a\xef\xbf\xbd" "b\\u001b[2J\\\"q\"") != NULL);
	/* Too small a buffer: -ENOBUFS, never a cut line. */
	CHECK_EQ(control_status_format(&st, buf, 40), -ENOBUFS);
	CHECK_EQ(control_error_format("permission denied", buf, sizeof(buf)), 30);
	CHECK(strcmp(buf, "{\"error\":\"permission denied\"}\n") == 0);
}

static void test_roundtrip(void)
{
	struct control_status a = doc(), b;
	char buf[CONTROL_ANSWER_MAX], again[CONTROL_ANSWER_MAX];
	const char *field = "x";

	CHECK(control_answer_parse(doc_line, &b, &field) == 0);
	CHECK(field == NULL);
	CHECK(b.locked && !b.deactivated && b.error[0] == '\0');
	CHECK(strcmp(b.reason, a.reason) == 0 && strcmp(b.key, a.key) == 0);
	CHECK_EQ(b.key_state, 5);
	CHECK_EQ(b.poll, 30);
	CHECK_EQ(b.grace, 300);
	CHECK(strcmp(b.last_poll, a.last_poll) == 0);
	CHECK(strcmp(b.backing, a.backing) == 0 && strcmp(b.mountpoint, a.mountpoint) == 0);
	/* What keyfsctl prints for status --json is what the daemon sent. */
	CHECK(control_status_format(&b, again, sizeof(again)) > 0);
	CHECK(strcmp(again, doc_line) == 0);
	a.key_state = a.poll = -1;
	a.last_poll[0] = '\0';
	CHECK(control_status_format(&a, buf, sizeof(buf)) > 0);
	CHECK(control_answer_parse(buf, &b, NULL) == 0);
	CHECK_EQ(b.key_state, -1);
	CHECK_EQ(b.poll, -1);
	CHECK(b.last_poll[0] == '\0');
	/* Members it does not know, spaces and nesting within the bound are fine; missing ones are null. */
	CHECK(control_answer_parse(" { \"state\" : \"unlocked\", \"new\": [1, {\"a\": [[]]}] } \n", &b, NULL) == 0);
	CHECK(!b.locked && b.key[0] == '\0' && b.key_state == -1);
}

static void test_error_answer(void)
{
	struct control_status st;

	CHECK(control_answer_parse("{\"error\":\"denied \\u001b[2J\"}", &st, NULL) == 0);
	CHECK(strcmp(st.error, "denied \x1b[2J") == 0);
}

/* Returns the field a bad answer was refused for, or "" when it was refused as a whole. */
static const char *refused(const char *text, int want)
{
	struct control_status st;
	const char *field = NULL;
	int r = control_answer_parse(text, &st, &field);

	CHECK_EQ(r, want);
	if (r != want)
		fprintf(stderr, "  answer: %.80s\n", text);
	return field ? field : "";
}

static void test_bounds(void)
{
	char *big = malloc(CONTROL_ANSWER_MAX + 64);
	size_t n;

	/* Not one JSON object. */
	refused("", -EBADMSG);
	refused("[]", -EBADMSG);
	refused("{\"state\":\"locked\"} {}", -EBADMSG);
	refused("{\"state\":\"locked\"", -EBADMSG);
	/* Deeper than CONTROL_DEPTH_MAX, even inside a member nobody reads. */
	n = (size_t)snprintf(big, CONTROL_ANSWER_MAX, "{\"state\":\"locked\",\"x\":");
	for (int i = 0; i < CONTROL_DEPTH_MAX; i++)
		big[n++] = '[';
	for (int i = 0; i < CONTROL_DEPTH_MAX; i++)
		big[n++] = ']';
	snprintf(big + n, 8, "}");
	refused(big, -EBADMSG);
	/* Longer than CONTROL_ANSWER_MAX. */
	n = (size_t)snprintf(big, 64, "{\"state\":\"locked\",\"x\":\"");
	memset(big + n, 'a', CONTROL_ANSWER_MAX);
	snprintf(big + n + CONTROL_ANSWER_MAX, 8, "\"}");
	refused(big, -EBADMSG);
	/* Members of the wrong type, range or size name themselves. */
	CHECK(strcmp(refused("{}", -EPROTO), "state") == 0);
	CHECK(strcmp(refused("{\"state\":\"open\"}", -EPROTO), "state") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"key_state\":\"5\"}", -EPROTO), "key_state") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"key_state\":1.5}", -EPROTO), "key_state") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"poll\":-1}", -EPROTO), "poll") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"grace\":1e300}", -EPROTO), "grace") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"deactivated\":1}", -EPROTO), "deactivated") == 0);
	CHECK(strcmp(refused("{\"state\":\"locked\",\"backing\":7}", -EPROTO), "backing") == 0);
	CHECK(strcmp(refused("{\"error\":42}", -EPROTO), "error") == 0);
	n = (size_t)snprintf(big, 64, "{\"state\":\"locked\",\"reason\":\"");
	memset(big + n, 'r', CONTROL_REASON_MAX);
	snprintf(big + n + CONTROL_REASON_MAX, 8, "\"}");
	CHECK(strcmp(refused(big, -EPROTO), "reason") == 0);
	free(big);
}

static void test_requests(void)
{
	CHECK_EQ(control_request_parse("status\n"), CONTROL_STATUS);
	CHECK_EQ(control_request_parse("lock\n"), CONTROL_LOCK);
	CHECK_EQ(control_request_parse("unlock\n"), CONTROL_UNLOCK);
	CHECK_EQ(control_request_parse("lock"), -EINVAL);
	CHECK_EQ(control_request_parse("lock\nstatus\n"), -EINVAL);
	CHECK_EQ(control_request_parse("statu\n"), -EINVAL);
	CHECK(strcmp(control_request_name(CONTROL_UNLOCK), "unlock") == 0);
}

int main(void)
{
	test_format();
	test_roundtrip();
	test_error_answer();
	test_bounds();
	test_requests();
	return check_done();
}
