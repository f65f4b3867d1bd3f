//! Conditions of the common shape — envelope fields compared with
//! literals, `in` a list of literals, `has`, joined by `&&`, `||` and `!`
//! — evaluated on the event directly (its JSON, or an envelope holding its
//! head as text: [`Fields`]). CEL needs each field the
//! expression reads turned into its own values first (the whole
//! `properties` object for `properties.amount > 100`), which costs more
//! than the rest of a rule's work on an event.
//!
//! It answers exactly as the interpreter does, errors included (`!` of an
//! error is an error, `false && error` is false), and where the two might
//! differ — values of different kinds compared, an operand that is a list
//! or an object — it does not answer and the interpreter is asked.

use std::cmp::Ordering;

use cel::IdedExpr;
use cel::common::ast::{Expr, LiteralValue, operators};
use serde_json::Value;

use super::ENVELOPE_FIELDS;

/// What a condition reads an event's top-level fields from: its JSON, or
/// an envelope that holds its head as text.
pub trait Fields {
    fn field(&self, name: &str) -> Option<Field<'_>>;
}

/// A top-level field's value.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl Fields for Value {
    fn field(&self, name: &str) -> Option<Field<'_>> {
        self.get(name).map(Field::Json)
    }
}

/// A condition compiled for native evaluation.
#[derive(Debug)]
pub enum Native {
    Const(bool),
    /// A field read as a boolean.
    Field(Path),
    Not(Box<Native>),
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
    Compare(Op, Operand, Operand),
    In(Operand, Vec<Literal>),
    /// `has(path.field)`.
    Has(Path, String),
}

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
pub enum Operand {
    Field(Path),
    Literal(Literal),
}

#[derive(Debug)]
pub struct Path {
    root: &'static str,
    fields: Vec<String>,
}

#[derive(Debug)]
pub enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    String(String),
}

/// Why there is no boolean: the interpreter's evaluation error (the
/// condition does not match, and `!` does not make it), or a case left to
/// the interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Error,
    Ask,
}

impl Native {
    /// The native form of `expr`, when every node of it has one.
    pub fn compile(expr: &IdedExpr) -> Option<Native> {
        match &expr.expr {
            Expr::Literal(LiteralValue::Boolean(b)) => Some(Native::Const(*b.inner())),
            Expr::Ident(_) | Expr::Select(_) if !is_test(expr) => Some(Native::Field(path(expr)?)),
            Expr::Select(select) => Some(Native::Has(path(&select.operand)?, select.field.clone())),
            Expr::Call(call) if call.target.is_none() => {
                let arg = |i: usize| Native::compile(&call.args[i]).map(Box::new);
                match (call.func_name.as_str(), call.args.len()) {
                    (operators::LOGICAL_NOT, 1) => Some(Native::Not(arg(0)?)),
                    (operators::LOGICAL_AND, 2) => Some(Native::And(arg(0)?, arg(1)?)),
                    (operators::LOGICAL_OR, 2) => Some(Native::Or(arg(0)?, arg(1)?)),
                    (operators::IN, 2) => {
                        let Expr::List(list) = &call.args[1].expr else {
                            return None;
                        };
                        if !list.optional_indices.is_empty() {
                            return None;
                        }
                        let items = list.elements.iter().map(literal).collect::<Option<_>>()?;
                        Some(Native::In(operand(&call.args[0])?, items))
                    }
                    (name, 2) => {
                        let op = match name {
                            operators::EQUALS => Op::Eq,
                            operators::NOT_EQUALS => Op::Ne,
                            operators::LESS => Op::Lt,
                            operators::LESS_EQUALS => Op::Le,
                            operators::GREATER => Op::Gt,
                            operators::GREATER_EQUALS => Op::Ge,
                            _ => return None,
                        };
                        Some(Native::Compare(
                            op,
                            operand(&call.args[0])?,
                            operand(&call.args[1])?,
                        ))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The condition's value on `envelope`, as the interpreter's
    /// `_&&_`, `_||_` and `!_` work it out.
    pub fn eval<F: Fields + ?Sized>(&self, envelope: &F) -> Result<bool, Fault> {
        match self {
            Native::Const(b) => Ok(*b),
            Native::Field(path) => match path.resolve(envelope)? {
                Field::Json(Value::Bool(b)) => Ok(*b),
                _ => Err(Fault::Error),
            },
            Native::Not(inner) => inner.eval(envelope).map(|b| !b),
            Native::And(left, right) => {
                let left = left.eval(envelope);
                match left {
                    Ok(false) => return Ok(false),
                    Err(Fault::Ask) => return Err(Fault::Ask),
                    _ => {}
                }
                match (left, right.eval(envelope)?) {
                    (Ok(true), right) => Ok(right),
                    (_, false) => Ok(false),
                    _ => Err(Fault::Error),
                }
            }
            Native::Or(left, right) => {
                let left = left.eval(envelope);
                match left {
                    Ok(true) => return Ok(true),
                    Err(Fault::Ask) => return Err(Fault::Ask),
                    _ => {}
                }
                match (left, right.eval(envelope)?) {
                    (Ok(false), right) => Ok(right),
                    (_, true) => Ok(true),
                    _ => Err(Fault::Error),
                }
            }
            Native::Compare(op, left, right) => {
                let left = left.scalar(envelope)?;
                let right = right.scalar(envelope)?;
                match op {
                    Op::Eq => equal(left, right),
                    Op::Ne => equal(left, right).map(|e| !e),
                    Op::Lt => order(left, right).map(Ordering::is_lt),
                    Op::Le => order(left, right).map(Ordering::is_le),
                    Op::Gt => order(left, right).map(Ordering::is_gt),
                    Op::Ge => order(left, right).map(Ordering::is_ge),
                }
            }
            Native::In(item, list) => {
                let item = item.scalar(envelope)?;
                let mut found = false;
                for literal in list {
                    found |= equal(item, literal.scalar())?;
                }
                Ok(found)
            }
            Native::Has(path, field) => match path.resolve(envelope)? {
                Field::Json(Value::Object(map)) => Ok(map.contains_key(field)),
                _ => Err(Fault::Ask),
            },
        }
    }
}

fn is_test(expr: &IdedExpr) -> bool {
    matches!(&expr.expr, Expr::Select(s) if s.test)
}

/// `root.a.b` for an envelope field `root`.
fn path(expr: &IdedExpr) -> Option<Path> {
    match &expr.expr {
        Expr::Ident(name) => Some(Path {
            root: ENVELOPE_FIELDS.iter().copied().find(|f| f == name)?,
            fields: Vec::new(),
        }),
        Expr::Select(select) if !select.test => {
            let mut path = path(&select.operand)?;
            path.fields.push(select.field.clone());
            Some(path)
        }
        _ => None,
    }
}

fn operand(expr: &IdedExpr) -> Option<Operand> {
    match literal(expr) {
        Some(literal) => Some(Operand::Literal(literal)),
        None => path(expr).map(Operand::Field),
    }
}

fn literal(expr: &IdedExpr) -> Option<Literal> {
    let Expr::Literal(literal) = &expr.expr else {
        return None;
    };
    Some(match literal {
        LiteralValue::Null => Literal::Null,
        LiteralValue::Boolean(b) => Literal::Bool(*b.inner()),
        LiteralValue::Int(i) => Literal::Int(*i.inner()),
        LiteralValue::UInt(u) => Literal::UInt(*u.inner()),
        LiteralValue::Double(d) => Literal::Double(*d.inner()),
        LiteralValue::String(s) => Literal::String(s.inner().to_owned()),
        LiteralValue::Bytes(_) => return None,
    })
}

impl Path {
    /// The field's value; a missing variable or key, or a step into what
    /// is not an object, is the interpreter's error.
    fn resolve<'v, F: Fields + ?Sized>(&self, envelope: &'v F) -> Result<Field<'v>, Fault> {
        let root = envelope.field(self.root).ok_or(Fault::Error)?;
        if self.fields.is_empty() {
            return Ok(root);
        }
        // Text has no fields.
        let Field::Json(mut value) = root else {
            return Err(Fault::Error);
        };
        for field in &self.fields {
            value = match value {
                Value::Object(map) => map.get(field).ok_or(Fault::Error)?,
                _ => return Err(Fault::Error),
            };
        }
        Ok(Field::Json(value))
    }
}

/// A value to compare: as the interpreter holds a JSON value (a
/// non-negative integer is unsigned, a negative one signed).
#[derive(Debug, Clone, Copy)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    String(&'a str),
    /// A list or an object.
    Composite,
}

impl Operand {
    fn scalar<'a, F: Fields + ?Sized>(&'a self, envelope: &'a F) -> Result<Scalar<'a>, Fault> {
        let value = match self {
            Operand::Literal(literal) => return Ok(literal.scalar()),
            Operand::Field(path) => match path.resolve(envelope)? {
                Field::Text(text) => return Ok(Scalar::String(text)),
                Field::Json(value) => value,
            },
        };
        Ok(match value {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Scalar::UInt(u),
                (None, Some(i), _) => Scalar::Int(i),
                (None, None, Some(f)) => Scalar::Double(f),
                _ => return Err(Fault::Ask),
            },
            Value::String(s) => Scalar::String(s),
            Value::Array(_) | Value::Object(_) => Scalar::Composite,
        })
    }
}

impl Literal {
    fn scalar(&self) -> Scalar<'_> {
        match self {
            Literal::Null => Scalar::Null,
            Literal::Bool(b) => Scalar::Bool(*b),
            Literal::Int(i) => Scalar::Int(*i),
            Literal::UInt(u) => Scalar::UInt(*u),
            Literal::Double(d) => Scalar::Double(*d),
            Literal::String(s) => Scalar::String(s),
        }
    }
}

/// Equality of two values of one kind; values of different kinds are
/// left to the interpreter.
fn equal(left: Scalar, right: Scalar) -> Result<bool, Fault> {
    match (left, right) {
        (Scalar::Null, Scalar::Null) => Ok(true),
        (Scalar::Bool(a), Scalar::Bool(b)) => Ok(a == b),
        (Scalar::String(a), Scalar::String(b)) => Ok(a == b),
        _ => order(left, right).map(Ordering::is_eq),
    }
}

/// The order of two strings or two numbers: integers exactly, an integer
/// and a double as the double the integer converts to (as the
/// interpreter does).
fn order(left: Scalar, right: Scalar) -> Result<Ordering, Fault> {
    let float = |s| match s {
        Scalar::Int(i) => Some(i as f64),
        Scalar::UInt(u) => Some(u as f64),
        Scalar::Double(d) => Some(d),
        _ => None,
    };
    let integer = |s| match s {
        Scalar::Int(i) => Some(i128::from(i)),
        Scalar::UInt(u) => Some(i128::from(u)),
        _ => None,
    };
    match (left, right) {
        (Scalar::String(a), Scalar::String(b)) => Ok(a.cmp(b)),
        _ => {
            if let (Some(a), Some(b)) = (integer(left), integer(right)) {
                return Ok(a.cmp(&b));
            }
            match (float(left), float(right)) {
                (Some(a), Some(b)) => a.partial_cmp(&b).ok_or(Fault::Ask),
                _ => Err(Fault::Ask),
            }
        }
    }
}
