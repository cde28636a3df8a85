/*
 * pkcs11_faults: a fault-injecting PKCS #11 module for tests.
 *
 * It loads the real module named by $PKCS11_FAULTS_MODULE and forwards every call to it, except that,
 * on cue, chosen functions answer chosen CKR codes. The cue is the control file named by
 * $PKCS11_FAULTS_CONTROL, looked at (stat) on every call and re-read when it changed. Without the
 * variable, or without the file, the module only forwards.
 *
 * Control file, one cue a line ('#' starts a comment):
 *
 *   delay_ms=N                      N ms of added latency before every crypto call (Encrypt*, Decrypt*,
 *                                   Digest*, Sign*, Verify*, GenerateKey*, WrapKey, UnwrapKey, DeriveKey,
 *                                   SeedRandom, GenerateRandom): Init, length queries and Final included
 *   FUNC CKR_CODE [options]         FUNC answers CKR_CODE (a name, or a number: 0x30, 48) without calling
 *                                   the real module; by default once (count=1)
 *   FUNC [forward] [options]        no code: FUNC is forwarded, with the options' delay and flags; by
 *                                   default on every call (always)
 *
 *   FUNC is a PKCS #11 function name (C_Encrypt, C_Login, ...) or '*': every function except
 *   C_Initialize, C_Finalize, C_GetInfo and C_GetFunctionList (they still work while '*' rules are set,
 *   as p11-kit's client's do while its server is away).
 *
 *   options:
 *     count=N            fire N times (across every process sharing the control file), then stop
 *     always             fire on every matching call
 *     once               count=1
 *     after=N            let the first N matching calls through untouched, then fire
 *     delay_ms=N         sleep N ms before answering when the cue fires
 *     sticky_operation   tpm2-pkcs11's behaviour: the failed operation stays active in the session: the
 *                        next C_xxxInit of that kind (Encrypt, Decrypt, Digest, Sign, SignRecover, Verify,
 *                        VerifyRecover, FindObjects) on that session answers CKR_OPERATION_ACTIVE until
 *                        C_CloseSession / C_CloseAllSessions / C_Finalize. On a forward cue: set when the
 *                        real call fails (any code but CKR_OK and CKR_BUFFER_TOO_SMALL).
 *     reinit_required    p11-kit client's behaviour after its connection broke: from then on this process
 *                        gets the cue's code (CKR_DEVICE_ERROR on a forward cue whose real call failed)
 *                        from every function but C_Initialize/C_Finalize/C_GetInfo, until it calls
 *                        C_Finalize (forwarded: the real module then drops its sessions and login too)
 *                        and C_Initialize again. Per process: clearing the cue does not revive it.
 *     id=X               ignored, but part of the cue's identity: counts belong to a cue's text, so a cue
 *                        that stays in the file while others come and go keeps its counts, and a line
 *                        with a new id (FaultControl writes a unique one) starts from zero
 *
 *   The first cue (in file order) that matches the function and is still armed fires; later ones are not
 *   looked at for that call.
 *
 * An injected failure of an operation function (C_Encrypt, C_DecryptUpdate, C_FindObjects, ...) ends the
 * real module's operation as a conforming token would (the real C_xxxFinal is called and its result
 * dropped), unless sticky_operation is set. An injected failure of C_xxxInit never reaches the real module.
 *
 * Counting across processes: counts live in "$PKCS11_FAULTS_CONTROL.state" (lines "MATCHED FIRED CUE"),
 * updated under flock(2), so count=3 means 3 failures in total however many worker processes share the
 * file. If the state file cannot be opened, counts fall back to per-process ones. Sticky operations and
 * reinit_required are per process, as the sessions and connections they model are.
 *
 * $PKCS11_FAULTS_DEBUG=1 prints each fired cue on stderr.
 *
 * $PKCS11_FAULTS_CRYPTOKI_VERSION=MAJOR.MINOR (e.g. 3.0, 2.20) makes C_GetInfo report that Cryptoki version
 * instead of the real module's: how a caller copes with modules of other versions, where no such module
 * can be installed (Debian 12 has no PKCS #11 3.x module). Like a 3.x module, it still serves
 * C_GetFunctionList.
 *
 * Build: gcc -shared -fPIC -O2 -I/usr/include/p11-kit-1 pkcs11_faults.c -o pkcs11_faults.so -ldl -lpthread
 * (tests/pkcs11_faults/__init__.py does it.)
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------------------------------------------- */
/* The functions: name, kind of operation, flags. The Python helper reads the FN( lines of this table.  */

enum family { NOFAM, ENC, DEC, DIG, SIGN, SIGNREC, VER, VERREC, FIND, NFAMILIES };

#define F_CRYPTO 1 /* global delay_ms applies */
#define F_INIT 2   /* starts an operation of its family: refused while a sticky one is active */
#define F_OP 4     /* continues or ends an active operation of its family */
#define F_LIB 8    /* library-level: never matched by '*', never refused while reinit is required */

#define FUNCTIONS(FN)                                         \
    FN(C_Initialize, NOFAM, F_LIB)                            \
    FN(C_Finalize, NOFAM, F_LIB)                              \
    FN(C_GetInfo, NOFAM, F_LIB)                               \
    FN(C_GetFunctionList, NOFAM, F_LIB)                       \
    FN(C_GetSlotList, NOFAM, 0)                               \
    FN(C_GetSlotInfo, NOFAM, 0)                               \
    FN(C_GetTokenInfo, NOFAM, 0)                              \
    FN(C_GetMechanismList, NOFAM, 0)                          \
    FN(C_GetMechanismInfo, NOFAM, 0)                          \
    FN(C_InitToken, NOFAM, 0)                                 \
    FN(C_InitPIN, NOFAM, 0)                                   \
    FN(C_SetPIN, NOFAM, 0)                                    \
    FN(C_OpenSession, NOFAM, 0)                               \
    FN(C_CloseSession, NOFAM, 0)                              \
    FN(C_CloseAllSessions, NOFAM, 0)                          \
    FN(C_GetSessionInfo, NOFAM, 0)                            \
    FN(C_GetOperationState, NOFAM, 0)                         \
    FN(C_SetOperationState, NOFAM, 0)                         \
    FN(C_Login, NOFAM, 0)                                     \
    FN(C_Logout, NOFAM, 0)                                    \
    FN(C_CreateObject, NOFAM, 0)                              \
    FN(C_CopyObject, NOFAM, 0)                                \
    FN(C_DestroyObject, NOFAM, 0)                             \
    FN(C_GetObjectSize, NOFAM, 0)                             \
    FN(C_GetAttributeValue, NOFAM, 0)                         \
    FN(C_SetAttributeValue, NOFAM, 0)                         \
    FN(C_FindObjectsInit, FIND, F_INIT)                       \
    FN(C_FindObjects, FIND, F_OP)                             \
    FN(C_FindObjectsFinal, FIND, F_OP)                        \
    FN(C_EncryptInit, ENC, F_INIT | F_CRYPTO)                 \
    FN(C_Encrypt, ENC, F_OP | F_CRYPTO)                       \
    FN(C_EncryptUpdate, ENC, F_OP | F_CRYPTO)                 \
    FN(C_EncryptFinal, ENC, F_OP | F_CRYPTO)                  \
    FN(C_DecryptInit, DEC, F_INIT | F_CRYPTO)                 \
    FN(C_Decrypt, DEC, F_OP | F_CRYPTO)                       \
    FN(C_DecryptUpdate, DEC, F_OP | F_CRYPTO)                 \
    FN(C_DecryptFinal, DEC, F_OP | F_CRYPTO)                  \
    FN(C_DigestInit, DIG, F_INIT | F_CRYPTO)                  \
    FN(C_Digest, DIG, F_OP | F_CRYPTO)                        \
    FN(C_DigestUpdate, DIG, F_OP | F_CRYPTO)                  \
    FN(C_DigestKey, DIG, F_OP | F_CRYPTO)                     \
    FN(C_DigestFinal, DIG, F_OP | F_CRYPTO)                   \
    FN(C_SignInit, SIGN, F_INIT | F_CRYPTO)                   \
    FN(C_Sign, SIGN, F_OP | F_CRYPTO)                         \
    FN(C_SignUpdate, SIGN, F_OP | F_CRYPTO)                   \
    FN(C_SignFinal, SIGN, F_OP | F_CRYPTO)                    \
    FN(C_SignRecoverInit, SIGNREC, F_INIT | F_CRYPTO)         \
    FN(C_SignRecover, SIGNREC, F_OP | F_CRYPTO)               \
    FN(C_VerifyInit, VER, F_INIT | F_CRYPTO)                  \
    FN(C_Verify, VER, F_OP | F_CRYPTO)                        \
    FN(C_VerifyUpdate, VER, F_OP | F_CRYPTO)                  \
    FN(C_VerifyFinal, VER, F_OP | F_CRYPTO)                   \
    FN(C_VerifyRecoverInit, VERREC, F_INIT | F_CRYPTO)        \
    FN(C_VerifyRecover, VERREC, F_OP | F_CRYPTO)              \
    FN(C_DigestEncryptUpdate, NOFAM, F_CRYPTO)                \
    FN(C_DecryptDigestUpdate, NOFAM, F_CRYPTO)                \
    FN(C_SignEncryptUpdate, NOFAM, F_CRYPTO)                  \
    FN(C_DecryptVerifyUpdate, NOFAM, F_CRYPTO)                \
    FN(C_GenerateKey, NOFAM, F_CRYPTO)                        \
    FN(C_GenerateKeyPair, NOFAM, F_CRYPTO)                    \
    FN(C_WrapKey, NOFAM, F_CRYPTO)                            \
    FN(C_UnwrapKey, NOFAM, F_CRYPTO)                          \
    FN(C_DeriveKey, NOFAM, F_CRYPTO)                          \
    FN(C_SeedRandom, NOFAM, F_CRYPTO)                         \
    FN(C_GenerateRandom, NOFAM, F_CRYPTO)                     \
    FN(C_GetFunctionStatus, NOFAM, 0)                         \
    FN(C_CancelFunction, NOFAM, 0)                            \
    FN(C_WaitForSlotEvent, NOFAM, 0)

#define AS_ENUM(name, family, flags) FI_##name,
enum function_index { FUNCTIONS(AS_ENUM) NFUNCTIONS };

struct function_info {
    const char *name;
    enum family family;
    int flags;
};
#define AS_INFO(name, family, flags) {#name, family, flags},
static const struct function_info FN_INFO[NFUNCTIONS] = {FUNCTIONS(AS_INFO)};

/* CKR names the control file may use. The Python helper reads the RV( lines of this table. */
#define RETURN_VALUES(RV)                                                                                    \
    RV(CKR_OK) RV(CKR_CANCEL) RV(CKR_HOST_MEMORY) RV(CKR_SLOT_ID_INVALID) RV(CKR_GENERAL_ERROR)              \
    RV(CKR_FUNCTION_FAILED) RV(CKR_ARGUMENTS_BAD) RV(CKR_NO_EVENT) RV(CKR_NEED_TO_CREATE_THREADS)            \
    RV(CKR_CANT_LOCK) RV(CKR_ATTRIBUTE_READ_ONLY) RV(CKR_ATTRIBUTE_SENSITIVE) RV(CKR_ATTRIBUTE_TYPE_INVALID) \
    RV(CKR_ATTRIBUTE_VALUE_INVALID) RV(CKR_ACTION_PROHIBITED) RV(CKR_DATA_INVALID) RV(CKR_DATA_LEN_RANGE)    \
    RV(CKR_DEVICE_ERROR) RV(CKR_DEVICE_MEMORY) RV(CKR_DEVICE_REMOVED) RV(CKR_ENCRYPTED_DATA_INVALID)         \
    RV(CKR_ENCRYPTED_DATA_LEN_RANGE) RV(CKR_FUNCTION_CANCELED) RV(CKR_FUNCTION_NOT_PARALLEL)                 \
    RV(CKR_FUNCTION_NOT_SUPPORTED) RV(CKR_KEY_HANDLE_INVALID) RV(CKR_KEY_SIZE_RANGE)                         \
    RV(CKR_KEY_TYPE_INCONSISTENT) RV(CKR_KEY_NOT_NEEDED) RV(CKR_KEY_CHANGED) RV(CKR_KEY_NEEDED)              \
    RV(CKR_KEY_INDIGESTIBLE) RV(CKR_KEY_FUNCTION_NOT_PERMITTED) RV(CKR_KEY_NOT_WRAPPABLE)                    \
    RV(CKR_KEY_UNEXTRACTABLE) RV(CKR_MECHANISM_INVALID) RV(CKR_MECHANISM_PARAM_INVALID)                      \
    RV(CKR_OBJECT_HANDLE_INVALID) RV(CKR_OPERATION_ACTIVE) RV(CKR_OPERATION_NOT_INITIALIZED)                 \
    RV(CKR_PIN_INCORRECT) RV(CKR_PIN_INVALID) RV(CKR_PIN_LEN_RANGE) RV(CKR_PIN_EXPIRED) RV(CKR_PIN_LOCKED)   \
    RV(CKR_SESSION_CLOSED) RV(CKR_SESSION_COUNT) RV(CKR_SESSION_HANDLE_INVALID)                              \
    RV(CKR_SESSION_PARALLEL_NOT_SUPPORTED) RV(CKR_SESSION_READ_ONLY) RV(CKR_SESSION_EXISTS)                  \
    RV(CKR_SESSION_READ_ONLY_EXISTS) RV(CKR_SESSION_READ_WRITE_SO_EXISTS) RV(CKR_SIGNATURE_INVALID)          \
    RV(CKR_SIGNATURE_LEN_RANGE) RV(CKR_TEMPLATE_INCOMPLETE) RV(CKR_TEMPLATE_INCONSISTENT)                    \
    RV(CKR_TOKEN_NOT_PRESENT) RV(CKR_TOKEN_NOT_RECOGNIZED) RV(CKR_TOKEN_WRITE_PROTECTED)                     \
    RV(CKR_UNWRAPPING_KEY_SIZE_RANGE) RV(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT)                               \
    RV(CKR_USER_ALREADY_LOGGED_IN) RV(CKR_USER_NOT_LOGGED_IN) RV(CKR_USER_PIN_NOT_INITIALIZED)               \
    RV(CKR_USER_TYPE_INVALID) RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN) RV(CKR_USER_TOO_MANY_TYPES)             \
    RV(CKR_WRAPPED_KEY_INVALID) RV(CKR_WRAPPED_KEY_LEN_RANGE) RV(CKR_WRAPPING_KEY_HANDLE_INVALID)            \
    RV(CKR_WRAPPING_KEY_SIZE_RANGE) RV(CKR_WRAPPING_KEY_TYPE_INCONSISTENT) RV(CKR_RANDOM_SEED_NOT_SUPPORTED) \
    RV(CKR_RANDOM_NO_RNG) RV(CKR_DOMAIN_PARAMS_INVALID) RV(CKR_CURVE_NOT_SUPPORTED) RV(CKR_BUFFER_TOO_SMALL) \
    RV(CKR_SAVED_STATE_INVALID) RV(CKR_INFORMATION_SENSITIVE) RV(CKR_STATE_UNSAVEABLE)                       \
    RV(CKR_CRYPTOKI_NOT_INITIALIZED) RV(CKR_CRYPTOKI_ALREADY_INITIALIZED) RV(CKR_MUTEX_BAD)                  \
    RV(CKR_MUTEX_NOT_LOCKED) RV(CKR_NEW_PIN_MODE) RV(CKR_NEXT_OTP) RV(CKR_EXCEEDED_MAX_ITERATIONS)           \
    RV(CKR_FIPS_SELF_TEST_FAILED) RV(CKR_LIBRARY_LOAD_FAILED) RV(CKR_PIN_TOO_WEAK)                           \
    RV(CKR_PUBLIC_KEY_INVALID) RV(CKR_FUNCTION_REJECTED)

struct rv_name {
    const char *name;
    CK_RV value;
};
#define AS_RV(name) {#name, name},
static const struct rv_name RV_NAMES[] = {RETURN_VALUES(AS_RV){NULL, 0}};

static const char *rv_name(CK_RV rv) {
    for (const struct rv_name *r = RV_NAMES; r->name; r++)
        if (r->value == rv) return r->name;
    return "CKR_?";
}

/* ---------------------------------------------------------------------------------------------------- */
/* State                                                                                                  */

#define MAX_RULES 64
#define MAX_STICKY 1024
#define STATE_MAX 16384

struct rule {
    int line;        /* 1-based line of the control file */
    char key[256];   /* the cue's text, normalised: the key of its shared counts */
    int fn;          /* function index, -1 for '*' */
    int inject;      /* answer rv without calling the real module */
    CK_RV rv;
    long count;      /* -1: always */
    long after;
    long delay_ms;
    int sticky;
    int reinit;
    long matched;    /* per-process fallback counts (state file unusable) */
    long fired;
};

struct version {
    unsigned long long ino, size;
    long long sec, nsec;
    int exists;
};

struct sticky {
    CK_SESSION_HANDLE session;
    unsigned mask; /* 1 << family */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST *real;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static char *control_path;
static char *state_path;
static int debug;

static struct version loaded;   /* version of the control file the rules come from */
static int loaded_valid;
static struct rule rules[MAX_RULES];
static int nrules;
static long global_delay_ms;

static int dead;                /* reinit_required fired: answer dead_rv until C_Finalize */
static CK_RV dead_rv;
static struct sticky sticky[MAX_STICKY];
static int nsticky;

static void child_after_fork(void) {
    pthread_mutex_init(&lock, NULL);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    fprintf(stderr, "pkcs11_faults[%d]: %.*s\n", (int)getpid(), n, buf);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Control file                                                                                           */

static int lookup_function(const char *name) {
    for (int i = 0; i < NFUNCTIONS; i++)
        if (strcmp(FN_INFO[i].name, name) == 0) return i;
    return -2;
}

static int parse_rv(const char *text, CK_RV *rv) {
    for (const struct rv_name *r = RV_NAMES; r->name; r++) {
        if (strcmp(r->name, text) == 0) {
            *rv = r->value;
            return 1;
        }
    }
    if (text[0] >= '0' && text[0] <= '9') {
        char *end;
        errno = 0;
        unsigned long v = strtoul(text, &end, 0);
        if (errno == 0 && *end == '\0') {
            *rv = v;
            return 1;
        }
    }
    return 0;
}

static int parse_long(const char *text, long *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || end == text || v < 0) return 0;
    *out = v;
    return 1;
}

/* One line into *r (or the global delay). 1: a rule, 0: nothing (blank, comment, delay), -1: bad line. */
static int parse_line(char *line, int lineno, struct rule *r) {
    char *hash = strchr(line, '#');
    if (hash) *hash = '\0';
    char *save = NULL;
    char *tok = strtok_r(line, " \t\r\n", &save);
    if (!tok) return 0;
    if (strncmp(tok, "delay_ms=", 9) == 0) {
        long ms;
        if (!parse_long(tok + 9, &ms) || strtok_r(NULL, " \t\r\n", &save)) return -1;
        global_delay_ms = ms;
        return 0;
    }
    memset(r, 0, sizeof *r);
    r->line = lineno;
    snprintf(r->key, sizeof r->key, "%s", tok);
    r->count = 0; /* 0: not given yet */
    if (strcmp(tok, "*") == 0) {
        r->fn = -1;
    } else {
        r->fn = lookup_function(tok);
        if (r->fn < 0) return -1;
    }
    int count_given = 0;
    while ((tok = strtok_r(NULL, " \t\r\n", &save))) {
        long v;
        size_t used = strlen(r->key);
        snprintf(r->key + used, sizeof r->key - used, " %s", tok);
        if (strncmp(tok, "id=", 3) == 0) {
            continue; /* names the cue: a new id, new counts */
        } else if (strncmp(tok, "CKR_", 4) == 0 || (tok[0] >= '0' && tok[0] <= '9')) {
            if (!parse_rv(tok, &r->rv)) return -1;
            r->inject = 1;
        } else if (strcmp(tok, "forward") == 0 || strcmp(tok, "FORWARD") == 0) {
            r->inject = 0;
        } else if (strcmp(tok, "always") == 0) {
            r->count = -1;
            count_given = 1;
        } else if (strcmp(tok, "once") == 0) {
            r->count = 1;
            count_given = 1;
        } else if (strncmp(tok, "count=", 6) == 0 && parse_long(tok + 6, &v)) {
            r->count = v;
            count_given = 1;
        } else if (strncmp(tok, "after=", 6) == 0 && parse_long(tok + 6, &v)) {
            r->after = v;
        } else if (strncmp(tok, "delay_ms=", 9) == 0 && parse_long(tok + 9, &v)) {
            r->delay_ms = v;
        } else if (strcmp(tok, "sticky_operation") == 0) {
            r->sticky = 1;
        } else if (strcmp(tok, "reinit_required") == 0) {
            r->reinit = 1;
        } else {
            return -1;
        }
    }
    if (!count_given) r->count = r->inject ? 1 : -1;
    return 1;
}

static void version_of(struct version *v) {
    struct stat st;
    memset(v, 0, sizeof *v);
    if (control_path && stat(control_path, &st) == 0) {
        v->exists = 1;
        v->ino = st.st_ino;
        v->size = (unsigned long long)st.st_size;
        v->sec = st.st_mtim.tv_sec;
        v->nsec = st.st_mtim.tv_nsec;
    }
}

static int same_version(const struct version *a, const struct version *b) {
    return a->exists == b->exists && a->ino == b->ino && a->size == b->size && a->sec == b->sec &&
           a->nsec == b->nsec;
}

/* Called with the lock held: re-read the control file if it is not the one the rules come from. */
static void reload_if_changed(void) {
    struct version now;
    version_of(&now);
    if (loaded_valid && same_version(&now, &loaded)) return;
    nrules = 0;
    global_delay_ms = 0;
    loaded = now;
    loaded_valid = 1;
    if (!now.exists) return;
    FILE *f = fopen(control_path, "re");
    if (!f) return;
    char line[1024];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        struct rule r;
        int got = parse_line(line, lineno, &r);
        if (got < 0) {
            say("%s:%d: cue not understood, ignored", control_path, lineno);
        } else if (got > 0 && nrules < MAX_RULES) {
            int same = 0;
            for (int i = 0; i < nrules; i++)
                if (strncmp(rules[i].key, r.key, strlen(r.key)) == 0 &&
                    (rules[i].key[strlen(r.key)] == '\0' || rules[i].key[strlen(r.key)] == '#'))
                    same++;
            if (same) {
                size_t used = strlen(r.key);
                snprintf(r.key + used, sizeof r.key - used, "#%d", same + 1);
            }
            rules[nrules++] = r;
        }
    }
    fclose(f);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Shared counts                                                                                          */

/* The state file: one line per cue, "MATCHED FIRED KEY", KEY being the cue's text with single spaces (and
 * "#N" for the Nth identical line). Counts belong to a cue's text, not to a version of the control file:
 * a cue kept while others are added keeps its counts, a new cue starts from zero (FaultControl gives
 * each cue it writes a unique id=). Lines of cues no longer in the control file are kept (up to
 * MAX_STATE_LINES), so a process still running on an older version cannot re-arm a cue by accident. */

#define MAX_STATE_LINES 256
#define KEY_LEN 256

struct count_line {
    long matched, fired;
    char key[KEY_LEN];
};

static struct count_line state_lines[MAX_STATE_LINES];

static int read_state(int fd) {
    static char buf[STATE_MAX];
    ssize_t len = pread(fd, buf, sizeof buf - 1, 0);
    if (len <= 0) return 0;
    buf[len] = '\0';
    int n = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line && n < MAX_STATE_LINES; line = strtok_r(NULL, "\n", &save)) {
        struct count_line *c = &state_lines[n];
        int used = 0;
        if (sscanf(line, "%ld %ld %n", &c->matched, &c->fired, &used) != 2 || used == 0) continue;
        snprintf(c->key, sizeof c->key, "%s", line + used);
        n++;
    }
    return n;
}

static void write_state(int fd, int n) {
    static char buf[STATE_MAX];
    int len = 0;
    for (int i = 0; i < n && len < (int)sizeof buf - KEY_LEN - 64; i++)
        len += snprintf(buf + len, sizeof buf - len, "%ld %ld %s\n", state_lines[i].matched, state_lines[i].fired,
                        state_lines[i].key);
    if (pwrite(fd, buf, len, 0) == len && ftruncate(fd, len) == 0) return;
}

static int armed(const struct rule *r, long matched_before, long fired_before) {
    if (matched_before < r->after) return 0;
    return r->count < 0 || fired_before < r->count;
}

/* Called with the lock held. Of the rules matching function `fi`, the index of the first armed one
 * (counting the match and the firing), or -1. */
static int pick_rule(int fi) {
    int match[MAX_RULES], nmatch = 0;
    for (int i = 0; i < nrules; i++) {
        int fn = rules[i].fn;
        if (fn == fi || (fn == -1 && !(FN_INFO[fi].flags & F_LIB))) match[nmatch++] = i;
    }
    if (nmatch == 0) return -1;

    int fd = state_path ? open(state_path, O_RDWR | O_CREAT | O_CLOEXEC, 0666) : -1;
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        if (fd >= 0) close(fd);
        for (int k = 0; k < nmatch; k++) { /* per-process fallback */
            struct rule *r = &rules[match[k]];
            int fire = armed(r, r->matched, r->fired);
            r->matched++;
            if (fire) {
                r->fired++;
                return match[k];
            }
        }
        return -1;
    }
    int n = read_state(fd);
    int chosen = -1;
    for (int k = 0; k < nmatch && chosen < 0; k++) {
        const struct rule *r = &rules[match[k]];
        struct count_line *c = NULL;
        for (int i = 0; i < n && !c; i++)
            if (strcmp(state_lines[i].key, r->key) == 0) c = &state_lines[i];
        if (!c) {
            if (n == MAX_STATE_LINES) { /* forget the oldest */
                memmove(&state_lines[0], &state_lines[1], sizeof state_lines[0] * (MAX_STATE_LINES - 1));
                n--;
            }
            c = &state_lines[n++];
            c->matched = c->fired = 0;
            snprintf(c->key, sizeof c->key, "%s", r->key);
        }
        int fire = armed(r, c->matched, c->fired);
        c->matched++;
        if (fire) {
            c->fired++;
            chosen = match[k];
        }
    }
    write_state(fd, n);
    flock(fd, LOCK_UN);
    close(fd);
    return chosen;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Sticky operations                                                                                      */

static int sticky_has(CK_SESSION_HANDLE s, enum family f) {
    for (int i = 0; i < nsticky; i++)
        if (sticky[i].session == s) return (sticky[i].mask >> f) & 1;
    return 0;
}

static void sticky_add(CK_SESSION_HANDLE s, enum family f) {
    if (f == NOFAM) return;
    for (int i = 0; i < nsticky; i++) {
        if (sticky[i].session == s) {
            sticky[i].mask |= 1u << f;
            return;
        }
    }
    if (nsticky < MAX_STICKY) sticky[nsticky++] = (struct sticky){s, 1u << f};
}

static void sticky_drop(CK_SESSION_HANDLE s) {
    for (int i = 0; i < nsticky; i++) {
        if (sticky[i].session == s) {
            sticky[i] = sticky[--nsticky];
            return;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* The decision around each call                                                                          */

struct pending {
    int fi;
    int watch_sticky;
    int watch_reinit;
};

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

/* End the real module's active operation of family f in session s, dropping the result: what a
 * conforming token does when a call of that operation fails. */
static void end_real_operation(enum family f, CK_SESSION_HANDLE s) {
    CK_ULONG n = 0;
    CK_RV rv;
    unsigned char *buf;
    switch (f) {
#define FINISH(call_query, call_real)                   \
    rv = (call_query);                                  \
    if (rv == CKR_OK) {                                 \
        buf = malloc(n ? n : 1);                        \
        if (buf) {                                      \
            (void)(call_real);                          \
            free(buf);                                  \
        }                                               \
    }                                                   \
    break;
    case ENC:
        FINISH(real->C_EncryptFinal(s, NULL, &n), real->C_EncryptFinal(s, buf, &n))
    case DEC:
        FINISH(real->C_DecryptFinal(s, NULL, &n), real->C_DecryptFinal(s, buf, &n))
    case DIG:
        FINISH(real->C_DigestFinal(s, NULL, &n), real->C_DigestFinal(s, buf, &n))
    case SIGN:
        FINISH(real->C_SignFinal(s, NULL, &n), real->C_SignFinal(s, buf, &n))
    case SIGNREC:
        FINISH(real->C_SignRecover(s, (unsigned char *)"", 0, NULL, &n), real->C_SignRecover(s, (unsigned char *)"", 0, buf, &n))
    case VERREC:
        FINISH(real->C_VerifyRecover(s, (unsigned char *)"", 0, NULL, &n), real->C_VerifyRecover(s, (unsigned char *)"", 0, buf, &n))
    case VER:
        (void)real->C_VerifyFinal(s, (unsigned char *)"", 0);
        break;
    case FIND:
        (void)real->C_FindObjectsFinal(s);
        break;
    default:
        break;
#undef FINISH
    }
}

/* 1: answer *out without calling the real module; 0: forward, then pass the result through after(). */
static int before(int fi, CK_SESSION_HANDLE s, struct pending *p, CK_RV *out) {
    const struct function_info *info = &FN_INFO[fi];
    p->fi = fi;
    p->watch_sticky = p->watch_reinit = 0;
    long delay = 0;
    int end_operation = 0, answered = 0;

    pthread_mutex_lock(&lock);
    if (dead && !(info->flags & F_LIB)) {
        *out = dead_rv;
        pthread_mutex_unlock(&lock);
        return 1;
    }
    if ((info->flags & F_INIT) && sticky_has(s, info->family)) {
        *out = CKR_OPERATION_ACTIVE;
        pthread_mutex_unlock(&lock);
        return 1;
    }
    reload_if_changed();
    int chosen = pick_rule(fi);
    if (info->flags & F_CRYPTO) delay += global_delay_ms;
    if (chosen >= 0) {
        const struct rule *r = &rules[chosen];
        delay += r->delay_ms;
        if (r->inject) {
            answered = 1;
            *out = r->rv;
            if (r->sticky)
                sticky_add(s, info->family);
            else if (info->flags & F_OP)
                end_operation = 1;
            if (r->reinit) {
                dead = 1;
                dead_rv = r->rv;
            }
            if (debug) say("%s -> %s (cue on line %d)", info->name, rv_name(r->rv), r->line);
        } else {
            p->watch_sticky = r->sticky;
            p->watch_reinit = r->reinit;
        }
    }
    pthread_mutex_unlock(&lock);

    if (end_operation) end_real_operation(info->family, s);
    if (delay > 0) sleep_ms(delay);
    return answered;
}

static CK_RV after(const struct pending *p, CK_SESSION_HANDLE s, CK_RV rv) {
    const struct function_info *info = &FN_INFO[p->fi];
    if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && (p->watch_sticky || p->watch_reinit)) {
        pthread_mutex_lock(&lock);
        if (p->watch_sticky) sticky_add(s, info->family);
        if (p->watch_reinit) {
            dead = 1;
            dead_rv = CKR_DEVICE_ERROR;
        }
        pthread_mutex_unlock(&lock);
        if (debug) say("%s failed with %s: cue flags applied", info->name, rv_name(rv));
    }
    return rv;
}

/* ---------------------------------------------------------------------------------------------------- */
/* The wrappers                                                                                           */

#define NO_SESSION ((CK_SESSION_HANDLE)0)

#define WRAP(name, sess, params, args)              \
    static CK_RV w_##name params {                  \
        struct pending p_;                          \
        CK_RV rv_;                                  \
        if (before(FI_##name, (sess), &p_, &rv_))   \
            return rv_;                             \
        rv_ = real->name args;                      \
        return after(&p_, (sess), rv_);             \
    }

static CK_RV w_C_Initialize(void *init_args) {
    struct pending p;
    CK_RV rv;
    if (before(FI_C_Initialize, NO_SESSION, &p, &rv)) return rv;
    return after(&p, NO_SESSION, real->C_Initialize(init_args));
}

static CK_RV w_C_Finalize(void *reserved) {
    struct pending p;
    CK_RV rv;
    if (before(FI_C_Finalize, NO_SESSION, &p, &rv)) return rv;
    rv = real->C_Finalize(reserved);
    pthread_mutex_lock(&lock);
    /* The real module dropped every session (and the connection, for p11-kit's client). */
    dead = 0;
    nsticky = 0;
    pthread_mutex_unlock(&lock);
    return after(&p, NO_SESSION, rv);
}

static CK_RV w_C_CloseSession(CK_SESSION_HANDLE s) {
    struct pending p;
    CK_RV rv;
    if (before(FI_C_CloseSession, s, &p, &rv)) return rv;
    rv = real->C_CloseSession(s);
    pthread_mutex_lock(&lock);
    sticky_drop(s);
    pthread_mutex_unlock(&lock);
    return after(&p, s, rv);
}

static CK_RV w_C_CloseAllSessions(CK_SLOT_ID slot) {
    struct pending p;
    CK_RV rv;
    if (before(FI_C_CloseAllSessions, NO_SESSION, &p, &rv)) return rv;
    rv = real->C_CloseAllSessions(slot);
    pthread_mutex_lock(&lock);
    nsticky = 0; /* sessions of other slots too: good enough for one-token tests */
    pthread_mutex_unlock(&lock);
    return after(&p, NO_SESSION, rv);
}

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST **list);

static CK_VERSION reported_version; /* {0, 0}: report the real module's */

static CK_RV w_C_GetInfo(CK_INFO *info) {
    struct pending p;
    CK_RV rv;
    if (before(FI_C_GetInfo, NO_SESSION, &p, &rv)) return rv;
    rv = real->C_GetInfo(info);
    if (rv == CKR_OK && info && reported_version.major) info->cryptokiVersion = reported_version;
    return after(&p, NO_SESSION, rv);
}

WRAP(C_GetSlotList, NO_SESSION, (unsigned char present, CK_SLOT_ID *list, unsigned long *count),
     (present, list, count))
WRAP(C_GetSlotInfo, NO_SESSION, (CK_SLOT_ID slot, CK_SLOT_INFO *info), (slot, info))
WRAP(C_GetTokenInfo, NO_SESSION, (CK_SLOT_ID slot, CK_TOKEN_INFO *info), (slot, info))
WRAP(C_WaitForSlotEvent, NO_SESSION, (CK_FLAGS flags, CK_SLOT_ID *slot, void *reserved), (flags, slot, reserved))
WRAP(C_GetMechanismList, NO_SESSION, (CK_SLOT_ID slot, CK_MECHANISM_TYPE *list, unsigned long *count),
     (slot, list, count))
WRAP(C_GetMechanismInfo, NO_SESSION, (CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO *info),
     (slot, type, info))
WRAP(C_InitToken, NO_SESSION, (CK_SLOT_ID slot, unsigned char *pin, unsigned long len, unsigned char *label),
     (slot, pin, len, label))
WRAP(C_InitPIN, s, (CK_SESSION_HANDLE s, unsigned char *pin, unsigned long len), (s, pin, len))
WRAP(C_SetPIN, s, (CK_SESSION_HANDLE s, unsigned char *o, unsigned long ol, unsigned char *n, unsigned long nl),
     (s, o, ol, n, nl))
WRAP(C_OpenSession, NO_SESSION,
     (CK_SLOT_ID slot, CK_FLAGS flags, void *app, CK_NOTIFY notify, CK_SESSION_HANDLE *session),
     (slot, flags, app, notify, session))
WRAP(C_GetSessionInfo, s, (CK_SESSION_HANDLE s, CK_SESSION_INFO *info), (s, info))
WRAP(C_GetOperationState, s, (CK_SESSION_HANDLE s, unsigned char *state, unsigned long *len), (s, state, len))
WRAP(C_SetOperationState, s,
     (CK_SESSION_HANDLE s, unsigned char *state, unsigned long len, CK_OBJECT_HANDLE ek, CK_OBJECT_HANDLE ak),
     (s, state, len, ek, ak))
WRAP(C_Login, s, (CK_SESSION_HANDLE s, CK_USER_TYPE user, unsigned char *pin, unsigned long len),
     (s, user, pin, len))
WRAP(C_Logout, s, (CK_SESSION_HANDLE s), (s))
WRAP(C_CreateObject, s, (CK_SESSION_HANDLE s, CK_ATTRIBUTE *t, unsigned long n, CK_OBJECT_HANDLE *o),
     (s, t, n, o))
WRAP(C_CopyObject, s,
     (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE *t, unsigned long n, CK_OBJECT_HANDLE *no),
     (s, o, t, n, no))
WRAP(C_DestroyObject, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o), (s, o))
WRAP(C_GetObjectSize, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, unsigned long *size), (s, o, size))
WRAP(C_GetAttributeValue, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE *t, unsigned long n),
     (s, o, t, n))
WRAP(C_SetAttributeValue, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE *t, unsigned long n),
     (s, o, t, n))
WRAP(C_FindObjectsInit, s, (CK_SESSION_HANDLE s, CK_ATTRIBUTE *t, unsigned long n), (s, t, n))
WRAP(C_FindObjects, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *o, unsigned long max, unsigned long *n),
     (s, o, max, n))
WRAP(C_FindObjectsFinal, s, (CK_SESSION_HANDLE s), (s))

#define INIT_PARAMS (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k)
#define IO_PARAMS (CK_SESSION_HANDLE s, unsigned char *in, unsigned long inl, unsigned char *o, unsigned long *ol)
#define FINAL_PARAMS (CK_SESSION_HANDLE s, unsigned char *o, unsigned long *ol)
#define PART_PARAMS (CK_SESSION_HANDLE s, unsigned char *in, unsigned long inl)

WRAP(C_EncryptInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_Encrypt, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_EncryptUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_EncryptFinal, s, FINAL_PARAMS, (s, o, ol))
WRAP(C_DecryptInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_Decrypt, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DecryptUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DecryptFinal, s, FINAL_PARAMS, (s, o, ol))
WRAP(C_DigestInit, s, (CK_SESSION_HANDLE s, CK_MECHANISM *m), (s, m))
WRAP(C_Digest, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DigestUpdate, s, PART_PARAMS, (s, in, inl))
WRAP(C_DigestKey, s, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE k), (s, k))
WRAP(C_DigestFinal, s, FINAL_PARAMS, (s, o, ol))
WRAP(C_SignInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_Sign, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_SignUpdate, s, PART_PARAMS, (s, in, inl))
WRAP(C_SignFinal, s, FINAL_PARAMS, (s, o, ol))
WRAP(C_SignRecoverInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_SignRecover, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_VerifyInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_Verify, s, (CK_SESSION_HANDLE s, unsigned char *in, unsigned long inl, unsigned char *sig, unsigned long sl),
     (s, in, inl, sig, sl))
WRAP(C_VerifyUpdate, s, PART_PARAMS, (s, in, inl))
WRAP(C_VerifyFinal, s, (CK_SESSION_HANDLE s, unsigned char *sig, unsigned long sl), (s, sig, sl))
WRAP(C_VerifyRecoverInit, s, INIT_PARAMS, (s, m, k))
WRAP(C_VerifyRecover, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DigestEncryptUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DecryptDigestUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_SignEncryptUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_DecryptVerifyUpdate, s, IO_PARAMS, (s, in, inl, o, ol))
WRAP(C_GenerateKey, s, (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *t, unsigned long n, CK_OBJECT_HANDLE *k),
     (s, m, t, n, k))
WRAP(C_GenerateKeyPair, s,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *pt, unsigned long pn, CK_ATTRIBUTE *vt,
      unsigned long vn, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv),
     (s, m, pt, pn, vt, vn, pub, priv))
WRAP(C_WrapKey, s,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE wk, CK_OBJECT_HANDLE k, unsigned char *o,
      unsigned long *ol),
     (s, m, wk, k, o, ol))
WRAP(C_UnwrapKey, s,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE uk, unsigned char *in, unsigned long inl,
      CK_ATTRIBUTE *t, unsigned long n, CK_OBJECT_HANDLE *k),
     (s, m, uk, in, inl, t, n, k))
WRAP(C_DeriveKey, s,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE bk, CK_ATTRIBUTE *t, unsigned long n,
      CK_OBJECT_HANDLE *k),
     (s, m, bk, t, n, k))
WRAP(C_SeedRandom, s, PART_PARAMS, (s, in, inl))
WRAP(C_GenerateRandom, s, (CK_SESSION_HANDLE s, unsigned char *o, unsigned long n), (s, o, n))
WRAP(C_GetFunctionStatus, s, (CK_SESSION_HANDLE s), (s))
WRAP(C_CancelFunction, s, (CK_SESSION_HANDLE s), (s))

static CK_FUNCTION_LIST wrapped = {
    .version = {2, 40},
#define AS_ENTRY(name, family, flags) .name = w_##name,
    FUNCTIONS(AS_ENTRY)
#undef AS_ENTRY
};

/* ---------------------------------------------------------------------------------------------------- */
/* Loading                                                                                                */

static void load_real(void) {
    const char *module = getenv("PKCS11_FAULTS_MODULE");
    const char *control = getenv("PKCS11_FAULTS_CONTROL");
    const char *dbg = getenv("PKCS11_FAULTS_DEBUG");
    const char *version = getenv("PKCS11_FAULTS_CRYPTOKI_VERSION");
    debug = dbg && *dbg && strcmp(dbg, "0") != 0;
    unsigned major, minor;
    if (version && sscanf(version, "%u.%u", &major, &minor) == 2 && major > 0 && major < 256 && minor < 256) {
        reported_version.major = (CK_BYTE)major;
        reported_version.minor = (CK_BYTE)minor;
    } else if (version && *version) {
        say("PKCS11_FAULTS_CRYPTOKI_VERSION=%s is not MAJOR.MINOR: ignored", version);
    }
    if (control && *control) {
        control_path = strdup(control);
        size_t n = strlen(control) + sizeof ".state";
        state_path = malloc(n);
        if (state_path) snprintf(state_path, n, "%s.state", control);
    }
    if (!module || !*module) {
        say("PKCS11_FAULTS_MODULE is not set: no module to forward to");
        return;
    }
    void *handle = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        say("cannot load %s: %s", module, dlerror());
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (!get) {
        say("%s has no C_GetFunctionList", module);
        return;
    }
    load_rv = get(&real);
    if (load_rv == CKR_OK && !real) load_rv = CKR_GENERAL_ERROR;
    if (load_rv != CKR_OK) say("%s: C_GetFunctionList answered %s", module, rv_name(load_rv));
    pthread_atfork(NULL, NULL, child_after_fork);
}

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST **list) {
    if (!list) return CKR_ARGUMENTS_BAD;
    pthread_once(&load_once, load_real);
    if (load_rv != CKR_OK) return load_rv;
    *list = &wrapped;
    return CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST **list) {
    return w_C_GetFunctionList(list);
}
