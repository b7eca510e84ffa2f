"""Demo and benchmark data: characters, scenes, XP requests, ST relationships and the ledger.

Why set-based SQL: every table is filled by INSERT ... SELECT over generate_series, with
random() seeded by setseed(), because a per-row Python loop cannot write 1M characters in
minutes. All of it is one transaction (ids from the tables' sequences, so seeding twice
appends), and each batch gets chronicle and player ids above the existing ones, so batches
never share a chronicle: scene participants and ST triples stay unique without looking at the
rows already there.

Violations simulate legacy rows that predate the constraints. A share of the rows breaks each
rule of DOMAIN.md "Integrity checks", so the audit has something to find. The character rules
and the scene flag rule are CHECK constraints added NOT VALID: Postgres still rejects new rows
that break them. So, only when violations > 0, the transaction drops those constraints,
inserts, and adds each back from its own catalog definition, NOT VALID, under the same name.
Meanwhile it holds ACCESS EXCLUSIVE locks on characters and scenes: a demo tool's price, paid
until commit. Every count returned for a violation kind is measured on the inserted rows
with the rules' own SQL, so it is exact even when kinds overlap (violations * kinds > 1).

Numbers in the SQL are formatted in from this module (ints and floats computed here, never
user text). Rows carry created_at in the past, but updated_at is now(): incremental jobs
read updated_at, and a batch appended after their last run must still be seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import rules
from workers.db import session_scope

# `warden up` loads this when the database has no characters: enough to see every flow.
DEMO_CHARACTERS = 200
DEMO_VIOLATIONS = 0.05
DEMO_RNG_SEED = 42  # the CLI's default, so `warden seed` and `warden up` agree

# The shape of a batch. The seed documents give no production figures, so these are
# invented to look like a live service: ~40 characters per chronicle, ~3 per player; each
# character plays ~0.9 scenes, asks for ~0.5 XP spends, and claims weekly XP half the time.
# 1M characters make 6.2M rows in ~2 minutes on a 2-core machine (PostgreSQL 15); ~45% of
# that is the per-row foreign-key checks (65 s with them switched off, superuser only).
CHARACTERS_PER_CHRONICLE = 40
CHARACTERS_PER_PLAYER = 3
SCENES_PER_CHARACTER = 0.25  # with 2..5 participants each
SPENDS_PER_CHARACTER = 0.5
WEEKLY_CLAIMERS = 0.5  # share of characters with claims, for 1..3 recent weeks
LEGACY_SHARE = 0.1  # characters still carrying a legacy spent_xp list
NPC_SHARE = 0.15
CO_STORYTELLER_SHARE = 0.3  # chronicles with a second storyteller

# A new character's status. Spends are mostly approved (85% of decisions), above the health
# report's 80% approval threshold, so clean demo data scores healthy.
STATUS_WEIGHTS: dict[str, float] = {"Un": 0.15, "Sub": 0.10, "App": 0.55, "Ret": 0.12, "Dec": 0.08}
SPEND_STATE_WEIGHTS: dict[str, float] = {"Pending": 0.15, "Approved": 0.72, "Denied": 0.13}
UNKNOWN_STATUS = "Zz"

# Violation kinds of characters -> the rules.check_sql() keys each one breaks. Each rule of
# DOMAIN.md "Integrity checks" has a kind; every check key belongs to one (a test says so).
CHARACTER_VIOLATIONS: dict[str, tuple[str, ...]] = {
    "negative_xp": ("xp_nonnegative",),
    "unknown_status": ("status_known",),
    "attribute_range": tuple(f"{name}_range" for name in rules.ATTRIBUTES),
    "ability_range": tuple(f"{name}_range" for name in rules.ABILITIES),
    "willpower_range": ("willpower_range",),
    "temporary_willpower_range": ("temporary_willpower_range",),
    "temporary_above_willpower": ("temporary_willpower_le_willpower",),
    "age_range": ("age_range",),
    "apparent_age_range": ("apparent_age_range",),
}
SCENE_VIOLATIONS: tuple[str, ...] = ("scenes_awaiting_xp", "xp_given_unfinished")
ST_VIOLATION = "duplicate_st_relationships"
VIOLATION_KINDS: tuple[str, ...] = (*CHARACTER_VIOLATIONS, *SCENE_VIOLATIONS, ST_VIOLATION)
TABLES: tuple[str, ...] = (
    "characters", "scenes", "scene_participants", "xp_spend_requests", "weekly_xp_requests",
    "st_relationships", "xp_ledger",
)
SCENE_FLAG_CONSTRAINT = "ck_scenes_xp_given_finished"

FIRST_NAMES = (
    "Ada", "Bram", "Celia", "Dmitri", "Esme", "Felix", "Greta", "Hugo", "Iris", "Jonah",
    "Katya", "Luca", "Mara", "Nils", "Odette", "Pavel", "Quinn", "Rosa", "Silas", "Tamsin",
    "Ugo", "Vera", "Wes", "Xenia", "Yusuf", "Zora",
)
LAST_NAMES = (
    "Ashdown", "Blackwood", "Crane", "Dorsey", "Ellery", "Fenwick", "Graves", "Holloway",
    "Ives", "Jarrow", "Kettering", "Lowell", "Marsh", "Nightingale", "Orloff", "Price",
    "Quill", "Ravenscroft", "Sable", "Thorne", "Underhill", "Vance", "Whitlock", "Yardley",
)
CONCEPTS = (
    "Occult investigator", "Street medic", "Disgraced cop", "Tech journalist",
    "Night-shift nurse", "Grad student", "Antique dealer", "Bike courier", "Parish priest",
    "Bouncer", "Hacker", "Private detective",
)
GAMELINES = (
    "vampire", "werewolf", "mage", "wraith", "changeling", "hunter", "mummy", "demon",
)
SCENE_PLACES = (
    "Elysium", "The Docks", "Old Cathedral", "Night Market", "Rooftops", "Subway Tunnels",
    "Harbor Warehouse", "City Archive",
)
SCENE_EVENTS = (
    "Ambush", "Negotiation", "Investigation", "Chase", "Ritual", "Court", "Heist", "Funeral",
)
# Traits a spend may raise: attributes, then abilities, then willpower (indexes matter below).
SPEND_TRAITS: tuple[str, ...] = (*rules.ATTRIBUTES, *rules.ABILITIES, "willpower")
# Multipliers for spreading violations over a batch; a prime p permutes 0..n-1 by
# i -> i*p mod n whenever n is not a multiple of p, and no n up to 10M is one of all three.
_PERMUTE_PRIMES = (7919, 104729, 1299709)


def seed(characters: int, *, violations: float = 0.05, rng_seed: int = 42) -> dict[str, int]:
    """Append one batch of demo data in one transaction; returns rows created.

    Keys: each table in TABLES, and "violations.<kind>" for each of VIOLATION_KINDS (rows
    that break that rule; for ST duplicates, the extra rows the audit would delete).
    """
    if characters < 0:
        raise ValueError("characters must be >= 0")
    if not 0 <= violations <= 1:
        raise ValueError("violations is a share: 0..1")
    with session_scope() as session:
        return _Batch(session, characters, violations, rng_seed).run()


def seed_demo_if_empty() -> dict[str, int] | None:
    """Seed the small demo set when there are no characters yet (`warden up` calls this).

    The check and the seed share one transaction under a table lock, so two starts at once
    cannot both decide the table is empty.
    """
    with session_scope() as session:
        session.execute(text("LOCK TABLE characters IN SHARE ROW EXCLUSIVE MODE"))
        if session.execute(text("SELECT EXISTS (SELECT 1 FROM characters)")).scalar_one():
            return None
        return _Batch(session, DEMO_CHARACTERS, DEMO_VIOLATIONS, DEMO_RNG_SEED).run()


def _share(total: int, violations: float) -> int:
    """Rows of `total` to break per kind: at least one whenever violations > 0."""
    if total == 0 or violations <= 0:
        return 0
    return min(total, max(1, round(total * violations)))


def _picked(pos: str, total: int, count: int, slot: int, slots: int) -> str:
    """SQL true for exactly `count` of the positions 1..total, spread over the batch.

    Positions are permuted (i*p mod total), then slot k takes `count` of them starting k/slots
    of the way round: kinds share no rows until count * slots exceeds total.
    """
    if count <= 0:
        return "false"
    start = slot * total // slots
    mul = next((p for p in _PERMUTE_PRIMES if total % p), 1)
    return f"(mod(({pos} - 1) * {mul} + {total - start}, {total}) < {count})"


def _array(values: tuple[str, ...]) -> str:
    """A SQL text[] literal of constants defined in this module."""
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _choice(values: tuple[str, ...], draw: str = "random()") -> str:
    """SQL picking one of values uniformly by a [0, 1) draw."""
    return f"({_array(values)})[1 + floor({draw} * {len(values)})::int]"


def _weighted(weights: dict[str, float], draw: str) -> str:
    """SQL CASE picking a key of weights by a [0, 1) draw.

    `draw` must be a column, not random(): each WHEN would draw anew and skew the weights.
    """
    keys = list(weights)
    branches, edge = [], 0.0
    for key in keys[:-1]:
        edge += weights[key]
        branches.append(f"WHEN {draw} < {edge:.6f} THEN '{key}'")
    return f"CASE {' '.join(branches)} ELSE '{keys[-1]}' END"


def _cost(trait_type: str, value: str) -> str:
    """SQL XP cost of raising a trait to `value` (the costs live in rules.XP_COST_MULTIPLIER)."""
    return rules.xp_cost_sql(trait_type, value)


def _bad_age(low: int, high: int) -> str:
    """SQL for an age outside low..high: half negative, half up to 100 above the top."""
    return (f"CASE WHEN random() < 0.5 THEN {low - 1} - floor(random() * 10)::int "
            f"ELSE {high + 1} + floor(random() * 100)::int END")


@dataclass
class _Batch:
    """One seed run: sizes, id bases, and the SQL steps, all inside `session`'s transaction."""

    session: Session
    n: int
    violations: float
    rng_seed: int

    def run(self) -> dict[str, int]:
        """Every step in order; returns the counts (see `seed`)."""
        counts = {table: 0 for table in TABLES}
        counts.update({f"violations.{kind}": 0 for kind in VIOLATION_KINDS})
        if self.n == 0:
            return counts
        self._prepare()
        saved = self._drop_constraints() if self.violations > 0 else []
        counts["characters"] = self._characters()
        counts["st_relationships"] = self._st_relationships()
        counts["scenes"], counts["scene_participants"] = self._scenes()
        counts["xp_spend_requests"], spend_ledger = self._spend_requests()
        counts["weekly_xp_requests"], weekly_ledger = self._weekly_requests()
        counts["xp_ledger"] = spend_ledger + weekly_ledger + self._ledger()
        self._restore_constraints(saved)
        counts.update(self._measure_violations())
        return counts

    def _sql(self, sql: str) -> int:
        """Run one statement; its row count."""
        return int(self.session.execute(text(sql)).rowcount)  # type: ignore[attr-defined]

    def _scalar(self, sql: str) -> int:
        return int(self.session.execute(text(sql)).scalar_one())

    def _prepare(self) -> None:
        """Lock, seed the generator, size the batch and find its id bases."""
        # Clean seeds only keep other writers out (the id bases below must stay free); a
        # seed with violations drops constraints, which needs ACCESS EXCLUSIVE anyway.
        mode = "ACCESS EXCLUSIVE" if self.violations > 0 else "SHARE ROW EXCLUSIVE"
        self.session.execute(text(f"LOCK TABLE characters, scenes IN {mode} MODE"))
        # 64MB: the window sorts over a 1M-character batch stay in memory (default 4MB).
        self.session.execute(text("SET LOCAL work_mem = '64MB'"))
        # setseed wants -1..1; any int seed maps to its own value there.
        self.session.execute(
            text("SELECT setseed(:s)"), {"s": random.Random(self.rng_seed).uniform(-1, 1)}
        )
        self.chronicles = max(1, self.n // CHARACTERS_PER_CHRONICLE)
        self.players = max(1, self.n // CHARACTERS_PER_PLAYER)
        self.scene_count = max(1, round(self.n * SCENES_PER_CHARACTER))
        self.spend_count = round(self.n * SPENDS_PER_CHARACTER)
        self.chronicle_base = self._scalar(
            "SELECT greatest((SELECT max(chronicle_id) FROM characters), "
            "(SELECT max(chronicle_id) FROM scenes), "
            "(SELECT max(chronicle_id) FROM st_relationships), 0)"
        )
        self.player_base = self._scalar(
            "SELECT greatest((SELECT max(owner_id) FROM characters), "
            "(SELECT max(user_id) FROM st_relationships), 0)"
        )
        self.ledger_floor = self._scalar("SELECT coalesce(max(id), 0) FROM xp_ledger")

    def _constraint_names(self) -> dict[str, list[str]]:
        return {
            "characters": [f"ck_characters_{name}" for name in rules.check_sql()],
            "scenes": [SCENE_FLAG_CONSTRAINT],
        }

    def _drop_constraints(self) -> list[tuple[str, str, str]]:
        """Drop the rule constraints; returns (table, name, definition) to restore."""
        saved: list[tuple[str, str, str]] = []
        for table, names in self._constraint_names().items():
            rows = self.session.execute(
                text("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                     "WHERE conrelid = CAST(:t AS regclass) AND conname = ANY(:names) "
                     "ORDER BY conname"),
                {"t": table, "names": names},
            ).all()
            if rows:
                drops = ", ".join(f'DROP CONSTRAINT "{name}"' for name, _ in rows)
                self.session.execute(text(f"ALTER TABLE {table} {drops}"))
            saved += [(table, name, definition) for name, definition in rows]
        return saved

    def _restore_constraints(self, saved: list[tuple[str, str, str]]) -> None:
        """Add the dropped constraints back as they were, NOT VALID (the new legacy rows
        break them; a validated one comes back unvalidated, as the migration made it)."""
        for table in dict.fromkeys(table for table, _, _ in saved):
            adds = ", ".join(
                f'ADD CONSTRAINT "{name}" {definition.removesuffix(" NOT VALID")} NOT VALID'
                for t, name, definition in saved if t == table
            )
            self.session.execute(text(f"ALTER TABLE {table} {adds}"))

    def _characters(self) -> int:
        """demo_chars (position, id, chronicle, rank in chronicle), then the characters."""
        seq = self._scalar_text("SELECT pg_get_serial_sequence('characters', 'id')")
        self._sql(f"""
            CREATE TEMP TABLE demo_chars ON COMMIT DROP AS
            SELECT pos, id, chronicle_id, owner_id, created_at,
                   row_number() OVER (PARTITION BY chronicle_id ORDER BY pos) AS crank,
                   count(*) OVER (PARTITION BY chronicle_id) AS ccount
            FROM (
                SELECT g AS pos, nextval('{seq}') AS id,
                       {self.chronicle_base} + 1 + floor(random() * {self.chronicles})::bigint
                           AS chronicle_id,
                       {self.player_base} + 1 + floor(random() * {self.players})::bigint
                           AS owner_id,
                       now() - random() * interval '730 days' AS created_at
                FROM generate_series(1::bigint, {self.n}) g
                OFFSET 0
            ) s
        """)
        # Autovacuum never analyzes temp tables; the joins below need real row counts.
        self._sql("ANALYZE demo_chars")

        kinds = list(CHARACTER_VIOLATIONS)
        count = _share(self.n, self.violations)
        flag = {k: _picked("d.pos", self.n, count, i, len(kinds)) for i, k in enumerate(kinds)}
        att, abl = rules.ATTRIBUTE_RANGE, rules.ABILITY_RANGE
        wp, tmp = rules.WILLPOWER_RANGE, rules.TEMPORARY_WILLPOWER_RANGE
        age, app = rules.AGE_RANGE, rules.APPARENT_AGE_RANGE

        def bad(low: int, high: int) -> str:
            # Half just below the range, half up to 5 above it: clamps in both directions.
            return (f"CASE WHEN random() < 0.5 THEN {low - 1} "
                    f"ELSE {high + 1} + floor(random() * 5)::int END")

        attributes = [
            f"CASE WHEN s.v_attribute AND s.attr_pick = {i} THEN {bad(att.low, att.high)} "
            f"ELSE {att.low} + floor(random() * 4.5)::int END"  # 1..5, as humans have
            for i in range(len(rules.ATTRIBUTES))
        ]
        abilities = [
            f"CASE WHEN s.v_ability AND s.abil_pick = {i} THEN {bad(abl.low, abl.high)} "
            f"ELSE {abl.low} + floor(random() ^ 2 * 6)::int END"  # 0..5, mostly low
            for i in range(len(rules.ABILITIES))
        ]
        # Each kind breaks only its own rule: a willpower out of range keeps temporary within
        # 0..min(willpower, 10); temporary above willpower stays inside its own range.
        willpower = (
            f"CASE WHEN {flag['willpower_range']} THEN "
            f"CASE WHEN random() < 0.5 THEN {wp.low - 1} "
            f"ELSE {wp.high + 1} + floor(random() * 3)::int END "
            f"WHEN {flag['temporary_above_willpower']} THEN "
            f"{wp.low} + floor(random() * {tmp.high - 2})::int "
            f"ELSE {wp.low + 1} + floor(random() * 7)::int END"
        )
        temporary = (
            f"CASE WHEN s.v_temporary_range THEN {tmp.low - 1} - floor(random() * 3)::int "
            f"WHEN s.v_temporary_above THEN s.wp + 1 "
            f"ELSE floor(random() * (least(greatest(s.wp, {tmp.low}), {tmp.high}) + 1))::int END"
        )
        age_sql = (
            f"CASE WHEN s.v_age THEN {_bad_age(age.low, age.high)} "
            f"WHEN random() < 0.2 THEN NULL "  # age unknown
            f"ELSE 18 + floor(random() ^ 4 * {age.high - 20})::int END"  # mostly young
        )
        apparent_sql = (
            f"CASE WHEN s.v_apparent_age THEN {_bad_age(app.low, app.high)} "
            f"WHEN random() < 0.3 THEN NULL ELSE 16 + floor(random() * 60)::int END"
        )
        assert UNKNOWN_STATUS not in rules.STATUSES
        status = (f"CASE WHEN s.v_status THEN '{UNKNOWN_STATUS}' "
                  f"ELSE {_weighted({k: STATUS_WEIGHTS[k] for k in rules.STATUSES}, 's.r_status')}"
                  " END")
        columns = ", ".join(
            ("id", "name", "owner_id", "chronicle_id", "status", "xp", "npc", "concept",
             "created_at", "spent_xp", *rules.ATTRIBUTES, *rules.ABILITIES, "willpower",
             "temporary_willpower", "age", "apparent_age")
        )
        return self._sql(f"""
            INSERT INTO characters ({columns})
            SELECT s.id,
                   {_choice(FIRST_NAMES)} || ' ' || {_choice(LAST_NAMES)},
                   s.owner_id, s.chronicle_id, {status},
                   CASE WHEN s.v_xp THEN -1 - floor(random() * 20)::int
                        WHEN s.npc THEN 0
                        ELSE floor(random() * random() * 80)::int END,
                   s.npc, {_choice(CONCEPTS)}, s.created_at,
                   CASE WHEN s.legacy_n > 0 THEN ({self._legacy_spent_xp()}) END,
                   {", ".join(attributes)},
                   {", ".join(abilities)},
                   s.wp, {temporary}, {age_sql}, {apparent_sql}
            FROM (
                SELECT d.id, d.owner_id, d.chronicle_id, d.created_at,
                       {flag['negative_xp']} AS v_xp,
                       {flag['unknown_status']} AS v_status,
                       {flag['attribute_range']} AS v_attribute,
                       {flag['ability_range']} AS v_ability,
                       {flag['temporary_willpower_range']} AS v_temporary_range,
                       {flag['temporary_above_willpower']} AS v_temporary_above,
                       {flag['age_range']} AS v_age,
                       {flag['apparent_age_range']} AS v_apparent_age,
                       random() < {NPC_SHARE} AS npc, random() AS r_status,
                       floor(random() * {len(rules.ATTRIBUTES)})::int AS attr_pick,
                       floor(random() * {len(rules.ABILITIES)})::int AS abil_pick,
                       CASE WHEN random() < {LEGACY_SHARE} THEN 1 + floor(random() * 3)::int
                            ELSE 0 END AS legacy_n,
                       {willpower} AS wp
                FROM demo_chars d
                -- OFFSET 0 keeps this a subquery, so each random() above is drawn once.
                OFFSET 0
            ) s
        """)

    def _scalar_text(self, sql: str) -> str:
        return str(self.session.execute(text(sql)).scalar_one())

    def _legacy_spent_xp(self) -> str:
        """SQL for a legacy spend history of s.legacy_n entries, in both DOMAIN.md shapes:
        newer {index:int, trait, value:property name, cost, category, approved, timestamp,
        approved_at?} (60%) and older {index:"<id>_<type>_<trait>_<value>", trait, value:int,
        cost, approved}."""
        traits = (*rules.ATTRIBUTES, *rules.ABILITIES)
        return f"""
            SELECT jsonb_agg(CASE WHEN e.r_shape < 0.6 THEN jsonb_strip_nulls(jsonb_build_object(
                       'index', e.i - 1, 'trait', initcap(e.trait), 'value', e.trait,
                       'cost', {_cost('e.category', 'e.value')}, 'category', e.category,
                       'approved', e.state,
                       'timestamp', e.at,
                       'approved_at', CASE WHEN e.state <> 'Pending'
                                           THEN least(now(), e.at + interval '2 days') END))
                   ELSE jsonb_build_object(
                       'index', s.id || '_' || e.category || '_' || e.trait || '_' || e.value,
                       'trait', initcap(e.trait), 'value', e.value,
                       'cost', {_cost('e.category', 'e.value')},
                       'approved', e.state)
                   END ORDER BY e.i)
            FROM (
                SELECT x.i, x.value, x.r_shape, x.at,
                       ({_array(traits)})[x.k + 1] AS trait,
                       CASE WHEN x.k < {len(rules.ATTRIBUTES)} THEN 'attribute'
                            ELSE 'ability' END AS category,
                       {_weighted({"Approved": 0.7, "Pending": 0.15, "Denied": 0.15},
                                  "x.r_state")} AS state
                FROM (
                    SELECT i, floor(random() * {len(traits)})::int AS k,
                           2 + floor(random() * 3)::int AS value,
                           random() AS r_state, random() AS r_shape,
                           s.created_at + random() * (now() - s.created_at) AS at
                    FROM generate_series(1, s.legacy_n) i
                ) x
            ) e
        """

    def _st_relationships(self) -> int:
        """One or two storytellers per chronicle of the batch, plus the duplicate triples."""
        self._sql(f"""
            CREATE TEMP TABLE demo_st ON COMMIT DROP AS
            SELECT row_number() OVER (ORDER BY c.chronicle_id, j) AS pos, c.chronicle_id, j,
                   {self.player_base} + 1 + mod(c.first_user + j, {self.players}) AS user_id,
                   c.gameline
            FROM (
                SELECT {self.chronicle_base} + g AS chronicle_id,
                       floor(random() * {self.players})::bigint AS first_user,
                       {_choice(GAMELINES)} AS gameline,
                       CASE WHEN random() < {CO_STORYTELLER_SHARE} THEN 2 ELSE 1 END AS k
                FROM generate_series(1::bigint, {self.chronicles}) g
                OFFSET 0
            ) c
            -- distinct users within a chronicle (least: a batch may have a single player)
            CROSS JOIN LATERAL generate_series(0, least(c.k, {self.players}) - 1) j
        """)
        self._sql("ANALYZE demo_st")
        rows = self._sql(
            "INSERT INTO st_relationships (user_id, chronicle_id, gameline) "
            "SELECT user_id, chronicle_id, gameline FROM demo_st ORDER BY pos"
        )
        dups = _picked("pos", rows, _share(rows, self.violations), 0, 1)
        return rows + self._sql(
            "INSERT INTO st_relationships (user_id, chronicle_id, gameline) "
            f"SELECT user_id, chronicle_id, gameline FROM demo_st WHERE {dups} ORDER BY pos"
        )

    def _scenes(self) -> tuple[int, int]:
        """Scenes, each around an anchor character, with 2..5 participants of its chronicle."""
        seq = self._scalar_text("SELECT pg_get_serial_sequence('scenes', 'id')")
        count = _share(self.scene_count, self.violations)
        awaiting = _picked("g", self.scene_count, count, 0, len(SCENE_VIOLATIONS))
        unfinished = _picked("g", self.scene_count, count, 1, len(SCENE_VIOLATIONS))
        self._sql(f"""
            CREATE TEMP TABLE demo_scenes ON COMMIT DROP AS
            SELECT s.pos, nextval('{seq}') AS id, a.chronicle_id, a.crank AS start_crank,
                   a.ccount, s.k, s.finished,
                   CASE WHEN s.v_awaiting THEN false WHEN s.v_unfinished THEN true
                        ELSE s.finished END AS xp_given,
                   CASE WHEN s.finished THEN current_date - s.days_ago
                        WHEN s.r_undated < 0.5 THEN NULL  -- not played yet
                        ELSE current_date - mod(s.days_ago, 14) END AS date_played,
                   s.name
            FROM (
                SELECT g AS pos, 1 + floor(random() * {self.n})::bigint AS anchor,
                       2 + floor(random() * 4)::int AS k,
                       {awaiting} AS v_awaiting, {unfinished} AS v_unfinished,
                       CASE WHEN {awaiting} THEN true WHEN {unfinished} THEN false
                            ELSE random() < 0.8 END AS finished,
                       floor(random() * 730)::int AS days_ago, random() AS r_undated,
                       {_choice(SCENE_PLACES)} || ': ' || {_choice(SCENE_EVENTS)} AS name
                FROM generate_series(1::bigint, {self.scene_count}) g
                OFFSET 0
            ) s
            JOIN demo_chars a ON a.pos = s.anchor
        """)
        self._sql("ANALYZE demo_scenes")
        scenes = self._sql("""
            INSERT INTO scenes (id, chronicle_id, name, date_played, finished, xp_given,
                                created_at)
            SELECT id, chronicle_id, name, date_played, finished, xp_given,
                   coalesce(date_played, current_date) - interval '1 day'
            FROM demo_scenes ORDER BY id
        """)
        # Participants: consecutive ranks in the anchor's chronicle, wrapping round, so they
        # are distinct and all of the scene's chronicle.
        self._sql("""
            CREATE TEMP TABLE demo_part ON COMMIT DROP AS
            SELECT p.scene_id, p.character_id, p.awarded,
                   row_number() OVER (PARTITION BY p.character_id ORDER BY p.scene_id) AS rn,
                   count(*) OVER (PARTITION BY p.character_id) AS cnt
            FROM (
                SELECT s.id AS scene_id, c.id AS character_id, random() < 0.9 AS awarded
                FROM demo_scenes s
                CROSS JOIN LATERAL generate_series(0, least(s.k, s.ccount) - 1) j
                JOIN demo_chars c ON c.chronicle_id = s.chronicle_id
                                 AND c.crank = mod(s.start_crank - 1 + j, s.ccount) + 1
                OFFSET 0
            ) p
        """)
        self._sql("ANALYZE demo_part")
        participants = self._sql(
            "INSERT INTO scene_participants (scene_id, character_id) "
            "SELECT scene_id, character_id FROM demo_part ORDER BY scene_id, character_id"
        )
        return scenes, participants

    def _spend_requests(self) -> tuple[int, int]:
        """Spend requests in every state, decided by the chronicle's storyteller, with their
        spend (and refund) ledger rows; returns (requests, ledger rows)."""
        traits = len(SPEND_TRAITS)
        attributes, abilities = len(rules.ATTRIBUTES), len(rules.ABILITIES)
        row = self.session.execute(text(f"""
            WITH req AS (
                INSERT INTO xp_spend_requests (character_id, trait_name, trait_type,
                    trait_value, cost, state, created_at, decided_at, decided_by)
                SELECT c.id, t.trait_name, t.trait_type, t.value,
                       {_cost('t.trait_type', 't.value')}, t.state, t.created_at,
                       CASE WHEN t.state <> 'Pending' THEN
                           least(now(), t.created_at + t.r_decide * interval '72 hours') END,
                       CASE WHEN t.state <> 'Pending' THEN st.user_id END
                FROM (
                    SELECT r.who, r.created_at, r.r_decide,
                           ({_array(SPEND_TRAITS)})[r.k + 1] AS trait_name,
                           CASE WHEN r.k < {attributes} THEN 'attribute'
                                WHEN r.k < {attributes + abilities} THEN 'ability'
                                ELSE 'willpower' END AS trait_type,
                           CASE WHEN r.k < {attributes} THEN 2 + floor(r.r_value * 4)::int
                                WHEN r.k < {attributes + abilities}
                                    THEN 1 + floor(r.r_value * 5)::int
                                ELSE 2 + floor(r.r_value * 9)::int END AS value,
                           {_weighted(SPEND_STATE_WEIGHTS, 'r.r_state')} AS state
                    FROM (
                        SELECT 1 + floor(random() * {self.n})::bigint AS who,
                               floor(random() * {traits})::int AS k,
                               random() AS r_value, random() AS r_state,
                               -- squared: recent days are busier, so the health report's
                               -- 24-hour window sees activity
                               now() - random() ^ 2 * interval '120 days' AS created_at,
                               random() AS r_decide
                        FROM generate_series(1::bigint, {self.spend_count}) g
                        OFFSET 0
                    ) r
                ) t
                JOIN demo_chars c ON c.pos = t.who
                JOIN demo_st st ON st.chronicle_id = c.chronicle_id AND st.j = 0
                RETURNING id, character_id, cost, state, created_at, decided_at
            ), led AS (
                INSERT INTO xp_ledger (character_id, delta, kind, reason, spend_request_id,
                                       created_at)
                SELECT character_id, -cost, 'spend', 'XP spend request', id, created_at
                FROM req
                UNION ALL
                SELECT character_id, cost, 'refund', 'spend request denied', id, decided_at
                FROM req WHERE state = 'Denied'
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM req), (SELECT count(*) FROM led)
        """)).one()
        return int(row[0]), int(row[1])

    def _weekly_requests(self) -> tuple[int, int]:
        """Weekly claims for 1..3 recent weeks (unique per character and week); scene
        categories name a scene the character played; past weeks are mostly approved."""
        claims = {"learning": 0.5, "rp": 0.7, "focus": 0.4, "standingout": 0.2}
        assert set(claims) == set(rules.WEEKLY_NEEDS_SCENE)
        claim_cols = ", ".join(f"{c}, {c}_scene_id" for c in claims)
        claim_sql = ", ".join(
            f"p.scene_id IS NOT NULL AND w.r_{c} < {share}, "
            f"CASE WHEN w.r_{c} < {share} THEN p.scene_id END"
            for c, share in claims.items()
        )
        draws = ", ".join(f"random() AS r_{c}" for c in claims)
        earned = " + ".join(f"{c}::int" for c in rules.WEEKLY_CATEGORIES)
        row = self.session.execute(text(f"""
            WITH wk AS (
                INSERT INTO weekly_xp_requests (character_id, week, finishing, {claim_cols},
                    approved, approved_at, approved_by, created_at)
                SELECT w.id, w.week,
                       w.r_finishing < 0.6 OR p.scene_id IS NULL,  -- no scene: finishing only
                       {claim_sql},
                       w.approved,
                       CASE WHEN w.approved THEN
                           least(now(), w.week + interval '7 days' + w.r_at * interval '3 days')
                       END,
                       CASE WHEN w.approved THEN st.user_id END,
                       least(now(), w.week + interval '6 days')
                FROM (
                    SELECT e.id, e.chronicle_id,
                           (date_trunc('week', now()) - e.j * interval '7 days')::date AS week,
                           e.j > 0 AND random() < 0.9 AS approved,  -- this week: pending
                           random() AS r_finishing, {draws}, random() AS r_pick,
                           random() AS r_at
                    FROM (
                        SELECT c.id, c.chronicle_id, j
                        FROM (
                            SELECT id, chronicle_id,
                                   CASE WHEN random() < {WEEKLY_CLAIMERS}
                                        THEN 1 + floor(random() * 3)::int ELSE 0 END AS weeks
                            FROM demo_chars
                            OFFSET 0
                        ) c
                        CROSS JOIN LATERAL generate_series(0, c.weeks - 1) j
                    ) e
                    OFFSET 0
                ) w
                LEFT JOIN demo_part p ON p.character_id = w.id
                                     AND p.rn = 1 + floor(w.r_pick * p.cnt)::int
                JOIN demo_st st ON st.chronicle_id = w.chronicle_id AND st.j = 0
                RETURNING id, character_id, approved, approved_at, {earned} AS earned
            ), led AS (
                INSERT INTO xp_ledger (character_id, delta, kind, reason, weekly_request_id,
                                       created_at)
                SELECT character_id, earned, 'award', 'weekly XP', id, approved_at
                FROM wk WHERE approved AND earned > 0
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM wk), (SELECT count(*) FROM led)
        """)).one()
        return int(row[0]), int(row[1])

    def _ledger(self) -> int:
        """Scene award rows, then one opening balance per character, so each character's
        ledger sums to its xp (a reconciliation can then check every batch)."""
        awards = self._sql("""
            INSERT INTO xp_ledger (character_id, delta, kind, reason, scene_id, created_at)
            SELECT p.character_id, 1, 'award', 'scene XP', p.scene_id,
                   least(now(), coalesce(s.date_played + interval '1 day', now()))
            FROM demo_part p JOIN demo_scenes s ON s.id = p.scene_id
            WHERE s.xp_given AND p.awarded
        """)
        first = self._scalar("SELECT min(id) FROM demo_chars")
        opening = self._sql(f"""
            INSERT INTO xp_ledger (character_id, delta, kind, reason, created_at)
            SELECT c.id, c.xp - coalesce(l.total, 0), 'adjust',
                   'opening balance: XP held before the ledger', c.created_at
            FROM characters c
            JOIN demo_chars d ON d.id = c.id
            LEFT JOIN (
                SELECT character_id, sum(delta) AS total FROM xp_ledger
                WHERE id > {self.ledger_floor} GROUP BY character_id
            ) l ON l.character_id = c.id
            WHERE c.id >= {first} AND c.xp <> coalesce(l.total, 0)
        """)
        return awards + opening

    def _measure_violations(self) -> dict[str, int]:
        """Rows of this batch breaking each kind, counted with the rules' own SQL."""
        checks = rules.check_sql()

        def broken(keys: tuple[str, ...]) -> str:
            # A CHECK passes on NULL, so a NULL result is no violation here either.
            return " OR ".join(f"NOT coalesce(({checks[key]}), true)" for key in keys)

        first = self._scalar("SELECT min(id) FROM demo_chars")
        selects = ", ".join(
            f"count(*) FILTER (WHERE {broken(keys)})" for keys in CHARACTER_VIOLATIONS.values()
        )
        row = self.session.execute(text(
            f"SELECT {selects} FROM characters c JOIN demo_chars d ON d.id = c.id "
            f"WHERE c.id >= {first}"
        )).one()
        counts = {f"violations.{kind}": int(v) for kind, v in zip(CHARACTER_VIOLATIONS, row,
                                                                  strict=True)}
        awaiting, unfinished = self.session.execute(text(
            "SELECT count(*) FILTER (WHERE finished AND NOT xp_given), "
            "count(*) FILTER (WHERE xp_given AND NOT finished) FROM demo_scenes"
        )).one()
        counts["violations.scenes_awaiting_xp"] = int(awaiting)
        counts["violations.xp_given_unfinished"] = int(unfinished)
        counts[f"violations.{ST_VIOLATION}"] = self._scalar(f"""
            SELECT count(*) - count(DISTINCT (user_id, chronicle_id, gameline))
            FROM st_relationships
            WHERE chronicle_id BETWEEN {self.chronicle_base + 1}
                                   AND {self.chronicle_base + self.chronicles}
        """)
        return counts

