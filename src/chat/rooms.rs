//! [`Rooms`]: the rooms in memory and who is in each, kept from both sides — room → members
//! and member → rooms — and changed only through methods that update both, with the caps.
//!
//! A room's members are in join order (`list`, the REST API), a member's rooms too (`me`). A
//! room other than [`DEFAULT_ROOM`] is dropped from memory when its last member leaves (its
//! stored history stays) — unless it is *pinned*: a room whose broadcasts wait for their ids
//! stays until they are numbered and stored, so that its numbering is not lost with it;
//! [`DEFAULT_ROOM`] always exists. Joining is refused at
//! `--max-rooms-per-member` rooms for the member and, for a room that does not exist yet, at
//! `--max-rooms` rooms in the server.

use std::collections::HashMap;

use super::{ConnId, DEFAULT_ROOM};

/// One room in memory: its members and its message sequence.
#[derive(Debug)]
pub(crate) struct Room {
    /// Connections in join order.
    members: Vec<ConnId>,
    /// The id the next message gets; 0 while unknown (the store could not be read when the
    /// room was created: the next broadcast asks again).
    next_id: u64,
    /// Every id up to this one may be handed out: the engine said so (`IdsReserved`).
    reserved: u64,
    /// The highest id a `Reserve` was sent for: every id handed out is asked for once, so
    /// that an engine reserving ahead renews its block before it runs out.
    asked: u64,
    /// Kept in memory while empty: broadcasts to it wait for their ids (see [`Rooms::pin`]).
    pinned: bool,
    /// Created by the server API: kept while empty until it is deleted.
    kept: bool,
}

impl Room {
    /// Connections in join order.
    pub(crate) fn members(&self) -> &[ConnId] {
        &self.members
    }

    /// The id the next message gets; 0 while unknown.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Sets the id the next message gets.
    pub(crate) fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }

    /// The highest id the engine has reserved for this room (0: none yet).
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Notes an `IdsReserved` reply: ids up to `up_to` may be handed out.
    pub(crate) fn reserve_up_to(&mut self, up_to: u64) {
        self.reserved = self.reserved.max(up_to);
    }

    /// Notes that `Reserve` is sent for `id`; `false` when it was already.
    pub(crate) fn ask_reserve(&mut self, id: u64) -> bool {
        if id <= self.asked {
            return false;
        }
        self.asked = id;
        true
    }
}

/// Why a join was refused; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The member is in this many rooms already, the most allowed.
    MemberLimit(usize),
    /// The server holds this many rooms already, the most allowed, and the room is new.
    ServerLimit(usize),
}

/// Both sides of membership and the caps. See the module docs.
#[derive(Debug)]
pub(crate) struct Rooms {
    rooms: HashMap<String, Room>,
    /// Member → rooms in join order; a member in no room has no entry.
    of: HashMap<ConnId, Vec<String>>,
    max_rooms: usize,
    max_per_member: usize,
}

impl Rooms {
    /// [`DEFAULT_ROOM`] alone, its next message numbered `default_next_id`; at most
    /// `max_rooms` rooms in all and `max_per_member` for each member.
    pub(crate) fn new(max_rooms: usize, max_per_member: usize, default_next_id: u64) -> Self {
        let mut rooms = HashMap::new();
        rooms.insert(DEFAULT_ROOM.to_string(), Room::new(default_next_id));
        Rooms {
            rooms,
            of: HashMap::new(),
            max_rooms,
            max_per_member,
        }
    }

    /// Adds `conn` to `room`, creating the room (its next id from `first_id`, called only
    /// then) when it is not in memory. `Ok(false)` when `conn` was in it already.
    pub(crate) fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        first_id: impl FnOnce() -> u64,
    ) -> Result<bool, Refused> {
        let mine = self.rooms_of(conn);
        if mine.iter().any(|r| r == room) {
            return Ok(false);
        }
        if mine.len() >= self.max_per_member {
            return Err(Refused::MemberLimit(self.max_per_member));
        }
        if !self.rooms.contains_key(room) && self.rooms.len() >= self.max_rooms {
            return Err(Refused::ServerLimit(self.max_rooms));
        }
        self.rooms
            .entry(room.to_string())
            .or_insert_with(|| Room::new(first_id()))
            .members
            .push(conn);
        self.of.entry(conn).or_default().push(room.to_string());
        Ok(true)
    }

    /// Makes sure `room` is in memory (its next id from `first_id` when it is new); with
    /// `keep`, it stays while empty until [`Rooms::remove_room`]. `Ok(true)` when it is new.
    #[cfg(feature = "server-api")]
    pub(crate) fn create(
        &mut self,
        room: &str,
        keep: bool,
        first_id: impl FnOnce() -> u64,
    ) -> Result<bool, Refused> {
        if let Some(r) = self.rooms.get_mut(room) {
            r.kept |= keep;
            return Ok(false);
        }
        if self.rooms.len() >= self.max_rooms {
            return Err(Refused::ServerLimit(self.max_rooms));
        }
        let mut r = Room::new(first_id());
        r.kept = keep;
        self.rooms.insert(room.to_string(), r);
        Ok(true)
    }

    /// Drops `room` from memory with every member's side of it; returns its members (join
    /// order). The default room cannot be removed (nothing happens).
    #[cfg(feature = "server-api")]
    pub(crate) fn remove_room(&mut self, room: &str) -> Vec<ConnId> {
        if room == DEFAULT_ROOM {
            return Vec::new();
        }
        let Some(r) = self.rooms.remove(room) else {
            return Vec::new();
        };
        for conn in &r.members {
            if let Some(mine) = self.of.get_mut(conn) {
                mine.retain(|n| n != room);
                if mine.is_empty() {
                    self.of.remove(conn);
                }
            }
        }
        r.members
    }

    /// Takes `conn` out of `room`; `false` when it was not in it.
    pub(crate) fn leave(&mut self, conn: ConnId, room: &str) -> bool {
        let Some(mine) = self.of.get_mut(&conn) else {
            return false;
        };
        let Some(i) = mine.iter().position(|r| r == room) else {
            return false;
        };
        mine.remove(i);
        if mine.is_empty() {
            self.of.remove(&conn);
        }
        self.remove_member(conn, room);
        true
    }

    /// Takes `conn` out of every room; returns them in join order.
    pub(crate) fn leave_all(&mut self, conn: ConnId) -> Vec<String> {
        let mine = self.of.remove(&conn).unwrap_or_default();
        for room in &mine {
            self.remove_member(conn, room);
        }
        mine
    }

    /// `room`, when it is in memory.
    pub(crate) fn get(&self, room: &str) -> Option<&Room> {
        self.rooms.get(room)
    }

    /// `room`, when it is in memory, to number its messages.
    pub(crate) fn get_mut(&mut self, room: &str) -> Option<&mut Room> {
        self.rooms.get_mut(room)
    }

    /// Whether `room` is in memory.
    pub(crate) fn contains(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// `room`'s members in join order; none when it is not in memory.
    pub(crate) fn members(&self, room: &str) -> &[ConnId] {
        self.rooms.get(room).map_or(&[], |r| &r.members)
    }

    /// The rooms `conn` is in, in join order.
    pub(crate) fn rooms_of(&self, conn: ConnId) -> &[String] {
        self.of.get(&conn).map_or(&[], Vec::as_slice)
    }

    /// Whether `conn` is in `room`.
    pub(crate) fn is_member(&self, conn: ConnId, room: &str) -> bool {
        self.rooms_of(conn).iter().any(|r| r == room)
    }

    /// Rooms in memory.
    pub(crate) fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Every room in memory, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Room)> {
        self.rooms.iter().map(|(name, r)| (name.as_str(), r))
    }

    /// Keeps `room` in memory while empty, until [`Rooms::unpin`]: its broadcasts wait for
    /// their ids. `false` when the room is not in memory.
    pub(crate) fn pin(&mut self, room: &str) -> bool {
        self.rooms.get_mut(room).map(|r| r.pinned = true).is_some()
    }

    /// Ends [`Rooms::pin`]: the room is dropped now if it is empty (and not the default room).
    pub(crate) fn unpin(&mut self, room: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.pinned = false;
            if r.members.is_empty() && room != DEFAULT_ROOM && !r.kept {
                self.rooms.remove(room);
            }
        }
    }

    /// Takes `conn` out of `room`'s side and drops the room when it is empty (except the
    /// default room and pinned rooms). The member's side is the caller's.
    fn remove_member(&mut self, conn: ConnId, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(i) = r.members.iter().position(|&m| m == conn) {
            r.members.remove(i);
        }
        if r.members.is_empty() && room != DEFAULT_ROOM && !r.pinned && !r.kept {
            self.rooms.remove(room);
        }
    }

    /// Both sides agree, and every rule holds.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        assert!(
            self.rooms.contains_key(DEFAULT_ROOM),
            "the default room exists"
        );
        assert!(self.rooms.len() <= self.max_rooms.max(1), "too many rooms");
        for (name, room) in &self.rooms {
            assert!(
                !room.members.is_empty() || name == DEFAULT_ROOM || room.pinned || room.kept,
                "empty room {name} kept"
            );
            for (i, conn) in room.members.iter().enumerate() {
                assert!(!room.members[..i].contains(conn), "{conn} twice in {name}");
                assert!(
                    self.is_member(*conn, name),
                    "{name} lists {conn}, who does not list it"
                );
            }
        }
        for (conn, mine) in &self.of {
            assert!(!mine.is_empty(), "an empty entry for {conn}");
            assert!(
                mine.len() <= self.max_per_member,
                "{conn} is in too many rooms"
            );
            for (i, name) in mine.iter().enumerate() {
                assert!(!mine[..i].contains(name), "{conn} lists {name} twice");
                assert!(
                    self.members(name).contains(conn),
                    "{conn} lists {name}, which does not list it"
                );
            }
        }
    }
}

impl Room {
    fn new(next_id: u64) -> Self {
        Room {
            members: Vec::new(),
            next_id,
            reserved: 0,
            asked: 0,
            pinned: false,
            kept: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn join_and_leave_change_both_sides() {
        let mut r = Rooms::new(10, 10, 1);
        assert_eq!(r.join(1, DEFAULT_ROOM, || unreachable!()), Ok(true));
        assert_eq!(r.join(1, "a", || 5), Ok(true));
        assert_eq!(r.join(2, "a", || unreachable!()), Ok(true));
        assert_eq!(r.join(2, "a", || unreachable!()), Ok(false), "already in");
        r.assert_consistent();
        assert_eq!(r.members("a"), &[1, 2], "join order");
        assert_eq!(r.rooms_of(1), &[DEFAULT_ROOM, "a"], "join order");
        assert_eq!(r.get("a").map(Room::next_id), Some(5));
        assert!(r.leave(1, "a"));
        assert!(!r.leave(1, "a"), "not in it any more");
        assert!(!r.leave(3, "a"), "never was");
        r.assert_consistent();
        assert_eq!(r.members("a"), &[2]);
        assert!(!r.is_member(1, "a") && r.is_member(2, "a"));
    }

    #[test]
    fn an_empty_room_is_dropped_except_the_default() {
        let mut r = Rooms::new(10, 10, 0);
        r.join(1, "a", || 1).unwrap();
        r.join(1, DEFAULT_ROOM, || 1).unwrap();
        assert!(r.leave(1, "a"));
        assert!(!r.contains("a"));
        assert_eq!(r.members("a"), &[] as &[ConnId]);
        assert!(r.leave(1, DEFAULT_ROOM));
        assert!(r.contains(DEFAULT_ROOM));
        assert_eq!(r.len(), 1);
        assert_eq!(r.rooms_of(1), &[] as &[String]);
        r.assert_consistent();
        // Back again: a new room asks for its first id again.
        assert_eq!(r.join(2, "a", || 9), Ok(true));
        assert_eq!(r.get("a").map(Room::next_id), Some(9));
    }

    #[test]
    fn leave_all_returns_the_rooms_in_join_order() {
        let mut r = Rooms::new(10, 10, 0);
        for room in ["c", DEFAULT_ROOM, "a"] {
            r.join(1, room, || 1).unwrap();
        }
        r.join(2, "a", || 1).unwrap();
        assert_eq!(r.leave_all(1), vec!["c", DEFAULT_ROOM, "a"]);
        assert_eq!(r.leave_all(1), Vec::<String>::new(), "twice is harmless");
        r.assert_consistent();
        assert!(!r.contains("c") && r.contains("a"));
        assert_eq!(r.members("a"), &[2]);
        assert_eq!(r.members(DEFAULT_ROOM), &[] as &[ConnId]);
    }

    #[test]
    fn the_caps_refuse_and_change_nothing() {
        let mut r = Rooms::new(3, 2, 0);
        r.join(1, "a", || 1).unwrap();
        r.join(1, "b", || 1).unwrap();
        assert_eq!(r.join(1, "c", || 1), Err(Refused::MemberLimit(2)));
        assert_eq!(r.join(1, "a", || 1), Ok(false), "already in is no new room");
        // general, a, b: the server is full for new rooms, not for existing ones.
        assert_eq!(
            r.join(2, "c", || unreachable!()),
            Err(Refused::ServerLimit(3))
        );
        assert_eq!(r.join(2, "a", || unreachable!()), Ok(true));
        assert_eq!(r.join(2, DEFAULT_ROOM, || unreachable!()), Ok(true));
        assert_eq!(
            r.join(2, "b", || unreachable!()),
            Err(Refused::MemberLimit(2)),
            "the member cap is checked first"
        );
        r.assert_consistent();
        assert_eq!(r.rooms_of(2), &["a", DEFAULT_ROOM]);
        assert_eq!(r.len(), 3);
    }

    /// A small generator, so that the sequence is the same on every run.
    struct XorShift(u64);
    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Seeded sequences of joins and leaves against a model with nothing but lists: after every
    /// operation both sides agree with each other and with the model, results included.
    #[test]
    fn both_sides_agree_after_any_sequence() {
        const NAMES: [&str; 6] = [DEFAULT_ROOM, "a", "b", "c", "d", "e"];
        // How often each answer of join came, so that the test shows it reached them all.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for seed in 1..=50u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (max_rooms, per_member) = (1 + rng.below(5) as usize, 1 + rng.below(4) as usize);
            let mut r = Rooms::new(max_rooms, per_member, 1);
            // The model: room → members in join order (the default room always there).
            let mut rooms: BTreeMap<&str, Vec<ConnId>> = BTreeMap::from([(DEFAULT_ROOM, vec![])]);
            let mut of: BTreeMap<ConnId, Vec<&str>> = BTreeMap::new();
            for step in 0..400 {
                let conn = rng.below(5) as ConnId;
                let room = NAMES[rng.below(NAMES.len() as u64) as usize];
                let mine = of.entry(conn).or_default();
                match rng.below(10) {
                    0..=5 => {
                        let want = if mine.contains(&room) {
                            Ok(false)
                        } else if mine.len() >= per_member {
                            Err(Refused::MemberLimit(per_member))
                        } else if !rooms.contains_key(room) && rooms.len() >= max_rooms {
                            Err(Refused::ServerLimit(max_rooms))
                        } else {
                            rooms.entry(room).or_default().push(conn);
                            mine.push(room);
                            Ok(true)
                        };
                        let kind = match want {
                            Ok(joined) => format!("{joined}"),
                            Err(Refused::MemberLimit(_)) => "member limit".into(),
                            Err(Refused::ServerLimit(_)) => "server limit".into(),
                        };
                        *seen.entry(kind).or_default() += 1;
                        assert_eq!(r.join(conn, room, || 1), want, "seed {seed} step {step}");
                    }
                    6..=8 => {
                        let want = mine.contains(&room);
                        if want {
                            mine.retain(|m| *m != room);
                            let members = rooms.get_mut(room).expect("listed");
                            members.retain(|&c| c != conn);
                            if members.is_empty() && room != DEFAULT_ROOM {
                                rooms.remove(room);
                            }
                        }
                        assert_eq!(r.leave(conn, room), want, "seed {seed} step {step}");
                    }
                    _ => {
                        let want = std::mem::take(mine);
                        for room in &want {
                            let members = rooms.get_mut(room).expect("listed");
                            members.retain(|&c| c != conn);
                            if members.is_empty() && *room != DEFAULT_ROOM {
                                rooms.remove(room);
                            }
                        }
                        assert_eq!(r.leave_all(conn), want, "seed {seed} step {step}");
                    }
                }
                r.assert_consistent();
                assert_eq!(r.len(), rooms.len());
                for (room, members) in &rooms {
                    assert_eq!(
                        r.members(room),
                        members.as_slice(),
                        "seed {seed} step {step}"
                    );
                }
                for (conn, mine) in &of {
                    assert_eq!(
                        r.rooms_of(*conn),
                        mine.as_slice(),
                        "seed {seed} step {step}"
                    );
                }
            }
        }
        assert_eq!(seen.len(), 4, "every answer of join was reached: {seen:?}");
    }
}
