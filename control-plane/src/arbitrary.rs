//! Arbitrary values of any `Deserialize` type, for property tests: a serde `Deserializer`
//! that answers every request of a type's derived `Deserialize` with a seeded random
//! value, hostile ones included (NaN, infinities, extreme integers, control characters,
//! long strings). New fields of a record are covered without touching the tests.

use serde::de::value::{Error, StrDeserializer};
use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

/// A seeded source of arbitrary values.
pub(crate) struct Gen {
    rng: fastrand::Rng,
    depth: u32,
}

impl Gen {
    /// A generator whose values are fixed by `seed`.
    pub(crate) fn new(seed: u64) -> Gen {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
            depth: 0,
        }
    }

    /// An arbitrary `T`, or the reason `T` refused what was made (a custom
    /// `Deserialize` may reject random text).
    pub(crate) fn make<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, Error> {
        T::deserialize(Value(self))
    }

    fn string(&mut self) -> String {
        const POOL: [&str; 10] = [
            "",
            "a",
            "gw-1",
            "region=eu",
            "region=eu,tier=edge",
            "1.2.3",
            "selector region=eu",
            "é\u{0}\"\\\n\u{7f}\u{2028}",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "x86_64",
        ];
        match self.rng.u8(..10) {
            0 => "ü".repeat(self.rng.usize(100..400)),
            1 => (0..self.rng.usize(0..12))
                .map(|_| self.rng.char(..))
                .collect(),
            _ => POOL[self.rng.usize(..POOL.len())].to_owned(),
        }
    }

    fn u64(&mut self) -> u64 {
        match self.rng.u8(..6) {
            0 => 0,
            1 => u64::MAX,
            2 => self.rng.u64(..),
            _ => self.rng.u64(..1000),
        }
    }

    fn f64(&mut self) -> f64 {
        match self.rng.u8(..12) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => -0.0,
            4 => f64::MAX,
            5 => f64::MIN_POSITIVE,
            6 => 5e-324,
            7 => f64::from_bits(self.rng.u64(..)),
            _ => self.rng.f64() * 1000.0,
        }
    }

    /// Runs `f` one level deeper (deep values are kept small so generation ends).
    fn nested<T>(&mut self, f: impl FnOnce(&mut Gen) -> T) -> T {
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn len(&mut self) -> usize {
        if self.depth > 4 {
            0
        } else {
            self.rng.usize(0..4)
        }
    }
}

/// The deserializer of one value.
struct Value<'a>(&'a mut Gen);

macro_rules! unsigned {
    ($($method:ident $visit:ident $t:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            // Truncation is the point: extremes of every width.
            #[allow(clippy::cast_possible_truncation)]
            let n = self.0.u64() as $t;
            v.$visit(n)
        }
    )*};
}

impl<'de> Deserializer<'de> for Value<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_string(self.0.string())
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bool(self.0.rng.bool())
    }
    unsigned!(deserialize_u8 visit_u8 u8, deserialize_u16 visit_u16 u16,
        deserialize_u32 visit_u32 u32, deserialize_u64 visit_u64 u64);
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i8(self.0.rng.i8(..))
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i16(self.0.rng.i16(..))
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i32(self.0.rng.i32(..))
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(self.0.rng.i64(..))
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        #[allow(clippy::cast_possible_truncation)]
        let x = self.0.f64() as f32;
        v.visit_f32(x)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(self.0.f64())
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_char(self.0.rng.char(..))
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_string(self.0.string())
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_string(self.0.string())
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_byte_buf(v)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let n = self.0.rng.usize(0..64);
        v.visit_byte_buf((0..n).map(|_| self.0.rng.u8(..)).collect())
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        if self.0.depth > 4 || self.0.rng.bool() {
            v.visit_none()
        } else {
            v.visit_some(self)
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let gen = self.0;
        let left = gen.len();
        gen.nested(|gen| v.visit_seq(Items { gen, left }))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        self.0.nested(|gen| v.visit_seq(Items { gen, left: len }))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let gen = self.0;
        let left = gen.len();
        gen.nested(|gen| v.visit_map(Entries { gen, left }))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        self.0.nested(|gen| {
            v.visit_map(Fields {
                gen,
                fields,
                next: 0,
            })
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let variant = variants[self.0.rng.usize(..variants.len().max(1))];
        self.0.nested(|gen| v.visit_enum(Variant { gen, variant }))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_string(self.0.string())
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

struct Items<'a> {
    gen: &'a mut Gen,
    left: usize,
}

impl<'de> SeqAccess<'de> for Items<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(Value(self.gen)).map(Some)
    }
}

struct Entries<'a> {
    gen: &'a mut Gen,
    left: usize,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(Value(self.gen)).map(Some)
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(Value(self.gen))
    }
}

/// Every field of a struct, each with an arbitrary value.
struct Fields<'a> {
    gen: &'a mut Gen,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let key: StrDeserializer<'_, Error> = field.into_deserializer();
        seed.deserialize(key).map(Some)
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(Value(self.gen))
    }
}

struct Variant<'a> {
    gen: &'a mut Gen,
    variant: &'static str,
}

impl<'de, 'a> EnumAccess<'de> for Variant<'a> {
    type Error = Error;
    type Variant = Value<'a>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Value<'a>), Error> {
        let name: StrDeserializer<'_, Error> = self.variant.into_deserializer();
        Ok((seed.deserialize(name)?, Value(self.gen)))
    }
}

impl<'de> VariantAccess<'de> for Value<'_> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_struct("", fields, v)
    }
}
